package rabbitmq

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/branchkey/branchkey"
)

const (
	// DefaultRequestTimeout bounds one management API request of a Broker.
	DefaultRequestTimeout = 15 * time.Second
	// DefaultRequestAttempts is how many times an idempotent management API
	// call is tried when the API cannot be reached or answers 5xx.
	DefaultRequestAttempts = 3
	// deleteParallelism bounds the concurrent calls of DeleteBranch and
	// DeleteTree, so deleting a large branch does not flood the API.
	deleteParallelism = 8
	// maxResponse bounds what is read of a management API answer.
	maxResponse = 4 << 20
)

// Broker provisions the RabbitMQ side of leaves through the management HTTP
// API: a virtual host per tree, a fanout exchange per branch, and per leaf a
// durable queue and a user that may only consume that queue. It is safe for
// concurrent use; every method is idempotent.
type Broker struct {
	base     *url.URL // the API root, without credentials
	username string   // of the management API
	password string
	amqpUser string // the server's own AMQP user, granted full rights on each vhost
	client   *http.Client
	logger   *slog.Logger
	timeout  time.Duration
	attempts int

	flights flightGroup
}

var _ branchkey.Broker = (*Broker)(nil)

// BrokerOption configures a Broker built by NewBroker.
type BrokerOption func(*Broker)

// WithHTTPClient makes the Broker send its management API requests with c.
// The default client keeps up to 16 connections to the API.
func WithHTTPClient(c *http.Client) BrokerOption {
	return func(b *Broker) { b.client = c }
}

// WithLogger makes the Broker log to l. The default discards.
func WithLogger(l *slog.Logger) BrokerOption {
	return func(b *Broker) { b.logger = l }
}

// WithRequestTimeout bounds each management API request, on top of the
// caller's context. The default is DefaultRequestTimeout.
func WithRequestTimeout(d time.Duration) BrokerOption {
	return func(b *Broker) { b.timeout = d }
}

// NewBroker returns a Broker that speaks to the management API at adminURL,
// which carries the management user's credentials
// ("http://user:password@host:15672", optionally with the API's path prefix).
// amqpUser is the AMQP user the server publishes as; it gets full
// permissions on every virtual host the Broker creates. NewBroker does not
// contact the API.
func NewBroker(adminURL, amqpUser string, opts ...BrokerOption) (*Broker, error) {
	u, err := url.Parse(adminURL)
	if err != nil {
		return nil, fmt.Errorf("rabbitmq: management URL: %w", parseURLError(err))
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("rabbitmq: management URL scheme is %q, want http or https", u.Scheme)
	}
	if u.Host == "" {
		return nil, errors.New("rabbitmq: management URL has no host")
	}
	pw, ok := u.User.Password()
	if !ok || u.User.Username() == "" {
		return nil, errors.New("rabbitmq: management URL has no user:password")
	}
	if amqpUser == "" {
		return nil, errors.New("rabbitmq: the server's AMQP user name is empty")
	}
	b := &Broker{
		username: u.User.Username(),
		password: pw,
		amqpUser: amqpUser,
		timeout:  DefaultRequestTimeout,
		attempts: DefaultRequestAttempts,
	}
	u.User = nil
	u.RawQuery, u.Fragment = "", ""
	u.Path = strings.TrimSuffix(u.Path, "/")
	u.RawPath = strings.TrimSuffix(u.RawPath, "/")
	b.base = u
	for _, o := range opts {
		o(b)
	}
	if b.client == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = 16
		t.MaxConnsPerHost = 16
		t.DialContext = (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		b.client = &http.Client{Transport: t}
	}
	if b.logger == nil {
		b.logger = slog.New(slog.DiscardHandler)
	}
	if b.timeout <= 0 {
		b.timeout = DefaultRequestTimeout
	}
	return b, nil
}

// PrepareLeaf makes sure the tree's virtual host (with full permissions for
// the server's AMQP user), the branch's durable fanout exchange and the
// leaf's durable queue, bound to the exchange, exist. EUNAVAILABLE when the
// management API cannot be reached, EINVALID for an unusable id.
func (b *Broker) PrepareLeaf(ctx context.Context, treeID, branchID, leafID string) error {
	if err := checkNames("tree", treeID, "branch", branchID, "leaf", leafID); err != nil {
		return err
	}
	if err := b.ensureVhost(ctx, treeID); err != nil {
		return err
	}
	if err := b.ensureExchange(ctx, treeID, branchID); err != nil {
		return err
	}
	if err := b.do(ctx, request{
		method: http.MethodPut,
		path:   []string{"queues", treeID, leafID},
		body:   map[string]any{"durable": true, "auto_delete": false, "arguments": map[string]any{}},
		what:   fmt.Sprintf("declare queue %q in vhost %q", leafID, treeID),
	}); err != nil {
		return err
	}
	// A binding is a set member: posting the same one again changes nothing.
	return b.do(ctx, request{
		method: http.MethodPost,
		path:   []string{"bindings", treeID, "e", branchID, "q", leafID},
		body:   map[string]any{"routing_key": "", "arguments": map[string]any{}},
		what:   fmt.Sprintf("bind queue %q to exchange %q in vhost %q", leafID, branchID, treeID),
	})
}

// ensureVhost creates the tree's virtual host, makes sure it runs, and
// lets the server's AMQP user and the management user do anything in it.
// Concurrent calls for one tree share one round of requests, which matters
// when a whole tree's leaves log in at once.
func (b *Broker) ensureVhost(ctx context.Context, treeID string) error {
	return b.flights.do(ctx, "vhost\x00"+treeID, func(ctx context.Context) error {
		if err := b.do(ctx, request{
			method: http.MethodPut,
			path:   []string{"vhosts", treeID},
			body:   map[string]any{"description": "branchkey tree " + treeID},
			what:   fmt.Sprintf("create vhost %q", treeID),
		}); err != nil {
			return err
		}
		if err := b.waitVhostRunning(ctx, treeID); err != nil {
			return err
		}
		// RabbitMQ grants the management user that creates a vhost full
		// permissions, but not when the creating request was cut short, and
		// the management API needs them to declare anything in it.
		users := []string{b.amqpUser}
		if b.username != b.amqpUser {
			users = append(users, b.username)
		}
		for _, u := range users {
			if err := b.do(ctx, request{
				method: http.MethodPut,
				path:   []string{"permissions", treeID, u},
				body:   map[string]string{"configure": ".*", "write": ".*", "read": ".*"},
				what:   fmt.Sprintf("grant user %q full permissions on vhost %q", u, treeID),
			}); err != nil {
				return err
			}
		}
		return nil
	})
}

// waitVhostRunning waits until the vhost runs on every node, and starts it
// where it stays stopped. PUT answers 204 for a vhost that another caller
// (another replica, or one that gave up) is still creating, and declaring
// anything in it then fails with vhost_supervisor_not_running; a vhost whose
// creating request was cut short stays stopped until started.
func (b *Broker) waitVhostRunning(ctx context.Context, treeID string) error {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	for polls, delay := 0, 20*time.Millisecond; ; polls, delay = polls+1, min(2*delay, time.Second) {
		var v struct {
			ClusterState map[string]string `json:"cluster_state"`
		}
		if err := b.do(ctx, request{
			method: http.MethodGet,
			path:   []string{"vhosts", treeID},
			what:   fmt.Sprintf("check vhost %q runs", treeID),
			out:    &v,
		}); err != nil {
			return err
		}
		var stopped []string
		for node, state := range v.ClusterState {
			if state != "running" {
				stopped = append(stopped, node)
			}
		}
		if len(v.ClusterState) > 0 && len(stopped) == 0 {
			return nil
		}
		// The first poll may just have caught a creation in progress.
		if polls > 0 {
			for _, node := range stopped {
				b.logger.Warn("starting a stopped vhost", "vhost", treeID, "node", node, "state", v.ClusterState[node])
				if err := b.do(ctx, request{
					method: http.MethodPost,
					path:   []string{"vhosts", treeID, "start", node},
					what:   fmt.Sprintf("start vhost %q on node %q", treeID, node),
				}); err != nil {
					return err
				}
			}
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return unavailable(ctx.Err(), "rabbitmq: vhost %q is not running on every node: %v", treeID, v.ClusterState)
		case <-t.C:
		}
	}
}

// ensureExchange declares the branch's durable fanout exchange, sharing
// concurrent calls like ensureVhost.
func (b *Broker) ensureExchange(ctx context.Context, treeID, branchID string) error {
	return b.flights.do(ctx, "exchange\x00"+treeID+"\x00"+branchID, func(ctx context.Context) error {
		return b.do(ctx, request{
			method: http.MethodPut,
			path:   []string{"exchanges", treeID, branchID},
			body: map[string]any{
				"type": "fanout", "durable": true, "auto_delete": false, "internal": false,
				"arguments": map[string]any{},
			},
			what: fmt.Sprintf("declare exchange %q in vhost %q", branchID, treeID),
		})
	})
}

// GrantLeaf sets the leaf's user, with password as its password and no tags,
// and its permissions on the tree's virtual host: configure and write
// nothing, read its own queue. A new password replaces the old one for new
// connections; open connections stay. EUNAVAILABLE, EINVALID.
func (b *Broker) GrantLeaf(ctx context.Context, treeID, leafID, password string) error {
	if err := checkNames("tree", treeID, "leaf", leafID); err != nil {
		return err
	}
	if password == "" {
		return branchkey.Errorf(branchkey.EINVALID, "leaf %s: empty AMQP password", leafID)
	}
	if err := b.do(ctx, request{
		method: http.MethodPut,
		path:   []string{"users", leafID},
		body:   map[string]string{"password": password, "tags": ""},
		what:   fmt.Sprintf("set user %q", leafID),
	}); err != nil {
		return err
	}
	return b.do(ctx, request{
		method: http.MethodPut,
		path:   []string{"permissions", treeID, leafID},
		body:   leafPermissions(leafID),
		what:   fmt.Sprintf("set permissions of user %q on vhost %q", leafID, treeID),
	})
}

// leafPermissions are the permissions of a leaf's user: RabbitMQ matches
// resource names against these regular expressions, and "^$" matches no
// resource (the default exchange is checked as "amq.default").
func leafPermissions(leafID string) map[string]string {
	return map[string]string{
		"configure": "^$",
		"write":     "^$",
		"read":      "^" + regexp.QuoteMeta(leafID) + "$",
	}
}

// RevokeLeaf deletes the leaf's user, so its password stops working, and
// closes the user's open connections. Its queue stays, so messages keep
// waiting; GrantLeaf sets the user up again. EUNAVAILABLE, EINVALID.
//
// A connection whose handshake completes in the moment between the user's
// deletion and the listing of its connections can survive; it cannot
// reconnect.
func (b *Broker) RevokeLeaf(ctx context.Context, treeID, leafID string) error {
	if err := checkNames("tree", treeID, "leaf", leafID); err != nil {
		return err
	}
	if err := b.deleteUser(ctx, leafID); err != nil {
		return err
	}
	b.logger.Debug("revoked leaf", "tree", treeID, "leaf", leafID)
	return nil
}

// deleteUser deletes a leaf's user and then closes its connections: in that
// order, because a closed client could otherwise reconnect in between.
func (b *Broker) deleteUser(ctx context.Context, leafID string) error {
	if err := b.do(ctx, request{
		method:    http.MethodDelete,
		path:      []string{"users", leafID},
		what:      fmt.Sprintf("delete user %q", leafID),
		missingOK: true,
	}); err != nil {
		return err
	}
	return b.closeConnections(ctx, leafID)
}

// closeConnections closes every open connection of user.
func (b *Broker) closeConnections(ctx context.Context, user string) error {
	var conns []struct {
		Name  string `json:"name"`
		Vhost string `json:"vhost"`
	}
	if err := b.do(ctx, request{
		method:    http.MethodGet,
		path:      []string{"connections", "username", user},
		what:      fmt.Sprintf("list connections of user %q", user),
		missingOK: true,
		out:       &conns,
	}); err != nil {
		return err
	}
	var errs []error
	for _, c := range conns {
		err := b.do(ctx, request{
			method:    http.MethodDelete,
			path:      []string{"connections", c.Name},
			header:    http.Header{"X-Reason": {"branchkey: access of leaf " + user + " revoked"}},
			what:      fmt.Sprintf("close connection %q of user %q", c.Name, user),
			missingOK: true,
		})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		b.logger.Info("closed leaf connection", "leaf", user, "vhost", c.Vhost, "connection", c.Name)
	}
	return errors.Join(errs...)
}

// DeleteLeaf deletes the leaf's user, closing its connections, and its
// queue with any messages in it. EUNAVAILABLE, EINVALID.
func (b *Broker) DeleteLeaf(ctx context.Context, treeID, branchID, leafID string) error {
	if err := checkNames("tree", treeID, "branch", branchID, "leaf", leafID); err != nil {
		return err
	}
	return b.deleteLeaf(ctx, treeID, leafID)
}

func (b *Broker) deleteLeaf(ctx context.Context, treeID, leafID string) error {
	if err := b.deleteUser(ctx, leafID); err != nil {
		return err
	}
	return b.do(ctx, request{
		method:    http.MethodDelete,
		path:      []string{"queues", treeID, leafID},
		what:      fmt.Sprintf("delete queue %q in vhost %q", leafID, treeID),
		missingOK: true,
	})
}

// DeleteBranch deletes the leaves like DeleteLeaf, then the branch's
// exchange. EUNAVAILABLE, EINVALID; the errors of several leaves are joined.
func (b *Broker) DeleteBranch(ctx context.Context, treeID, branchID string, leafIDs []string) error {
	if err := checkNames("tree", treeID, "branch", branchID); err != nil {
		return err
	}
	if err := checkLeaves(leafIDs); err != nil {
		return err
	}
	err := forEach(ctx, leafIDs, func(ctx context.Context, id string) error {
		return b.deleteLeaf(ctx, treeID, id)
	})
	return errors.Join(err, b.do(ctx, request{
		method:    http.MethodDelete,
		path:      []string{"exchanges", treeID, branchID},
		what:      fmt.Sprintf("delete exchange %q in vhost %q", branchID, treeID),
		missingOK: true,
	}))
}

// DeleteTree deletes the tree's virtual host, which removes its exchanges,
// queues and permissions and closes its connections, then the leaves'
// users. EUNAVAILABLE, EINVALID.
func (b *Broker) DeleteTree(ctx context.Context, treeID string, leafIDs []string) error {
	if err := checkName("tree", treeID); err != nil {
		return err
	}
	if err := checkLeaves(leafIDs); err != nil {
		return err
	}
	if err := b.do(ctx, request{
		method:    http.MethodDelete,
		path:      []string{"vhosts", treeID},
		what:      fmt.Sprintf("delete vhost %q", treeID),
		missingOK: true,
	}); err != nil {
		return err
	}
	return forEach(ctx, leafIDs, b.deleteUser)
}

// request is one management API call.
type request struct {
	method string
	// path is the segments after /api/, each escaped on its own, so a vhost
	// named "/" becomes %2F.
	path   []string
	header http.Header
	body   any
	// what says what the call does, with the names involved, for errors.
	what string
	// missingOK makes 404 a success (deletes, listings of nothing).
	missingOK bool
	// out, if not nil, receives the decoded JSON answer.
	out any
}

// do sends r and retries it, when the API cannot be reached or answers 5xx,
// up to b.attempts times. Every call the Broker makes is idempotent, so a
// retry is safe even when the first try did reach the broker.
func (b *Broker) do(ctx context.Context, r request) error {
	segs := make([]string, len(r.path))
	for i, s := range r.path {
		segs[i] = url.PathEscape(s)
	}
	rawPath := b.base.EscapedPath() + "/api/" + strings.Join(segs, "/")
	u := *b.base
	u.RawPath = rawPath
	var err error
	if u.Path, err = url.PathUnescape(rawPath); err != nil {
		return fmt.Errorf("rabbitmq: %s: %w", r.what, err)
	}
	call := r.method + " " + rawPath
	var payload []byte
	if r.body != nil {
		if payload, err = json.Marshal(r.body); err != nil {
			return fmt.Errorf("rabbitmq: %s (%s): encode body: %w", r.what, call, err)
		}
	}
	delay := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		status, body, err := b.send(ctx, r, u.String(), payload)
		var failed error
		switch {
		case err != nil && ctx.Err() != nil:
			// The caller's deadline passed or it gave up: to it, the broker
			// is not there in time.
			return unavailable(ctx.Err(), "rabbitmq: %s (%s)", r.what, call)
		case err != nil:
			failed = unavailable(err, "rabbitmq: %s (%s): management API unreachable", r.what, call)
		case status >= 500:
			failed = unavailable(nil, "rabbitmq: %s (%s): management API answered %d %s", r.what, call, status, apiReason(body))
		case status == http.StatusNotFound && r.missingOK:
			return nil
		case status/100 == 2:
			if r.out != nil && status != http.StatusNoContent {
				if err := json.Unmarshal(body, r.out); err != nil {
					return fmt.Errorf("rabbitmq: %s (%s): decode answer: %w", r.what, call, err)
				}
			}
			return nil
		case status == http.StatusNotFound:
			// A name the call depends on is missing, such as the vhost of a
			// tree deleted meanwhile.
			return coded(branchkey.ENOTFOUND, nil, "rabbitmq: %s (%s): %s", r.what, call, apiReason(body))
		default:
			return fmt.Errorf("rabbitmq: %s (%s): management API answered %d %s", r.what, call, status, apiReason(body))
		}
		if attempt >= b.attempts {
			return failed
		}
		b.logger.Debug("management API call failed, retrying", "call", call, "attempt", attempt, "err", failed)
		t := time.NewTimer(delay/2 + rand.N(delay))
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (then: %w)", failed, ctx.Err())
		case <-t.C:
		}
		delay *= 2
	}
}

// send makes one attempt of r and returns the status and the body.
func (b *Broker) send(ctx context.Context, r request, target string, payload []byte) (int, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	var body io.Reader
	if payload != nil {
		body = bytes.NewReader(payload)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, target, body)
	if err != nil {
		return 0, nil, err
	}
	for k, v := range r.header {
		req.Header[k] = v
	}
	req.SetBasicAuth(b.username, b.password)
	if r.out != nil {
		// Only then: POST /api/vhosts/{vhost}/start/{node} answers 406 to it.
		req.Header.Set("Accept", "application/json")
	}
	if payload != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := b.client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return 0, nil, fmt.Errorf("read answer: %w", err)
	}
	return resp.StatusCode, data, nil
}

// apiReason extracts the management API's {"error": ..., "reason": ...}
// from an error answer, or a bounded prefix of whatever else it sent.
func apiReason(body []byte) string {
	var e struct {
		Error  string `json:"error"`
		Reason string `json:"reason"`
	}
	if json.Unmarshal(body, &e) == nil && (e.Error != "" || e.Reason != "") {
		return e.Error + ": " + e.Reason
	}
	const max = 200
	if len(body) > max {
		body = body[:max]
	}
	return strings.TrimSpace(string(body))
}

// checkNames checks (kind, name) pairs with checkName.
func checkNames(kindNames ...string) error {
	for i := 0; i+1 < len(kindNames); i += 2 {
		if err := checkName(kindNames[i], kindNames[i+1]); err != nil {
			return err
		}
	}
	return nil
}

func checkLeaves(ids []string) error {
	for _, id := range ids {
		if err := checkName("leaf", id); err != nil {
			return err
		}
	}
	return nil
}

// forEach calls fn for every id, at most deleteParallelism at a time, and
// joins the errors.
func forEach(ctx context.Context, ids []string, fn func(context.Context, string) error) error {
	errs := make([]error, len(ids))
	sem := make(chan struct{}, deleteParallelism)
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				errs[i] = ctx.Err()
				return
			}
			defer func() { <-sem }()
			errs[i] = fn(ctx, id)
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// flightGroup lets concurrent calls with one key share one execution, run
// by the first caller with its own context. A waiter whose leader gave up
// because of the leader's context runs the call itself, so one caller's
// cancellation does not fail the others.
type flightGroup struct {
	mu sync.Mutex
	m  map[string]*flight
}

type flight struct {
	done      chan struct{}
	err       error
	abandoned bool // the leader's context ended
}

func (g *flightGroup) do(ctx context.Context, key string, fn func(context.Context) error) error {
	for {
		g.mu.Lock()
		if f, ok := g.m[key]; ok {
			g.mu.Unlock()
			select {
			case <-f.done:
				if f.abandoned && ctx.Err() == nil {
					continue
				}
				return f.err
			case <-ctx.Done():
				return unavailable(ctx.Err(), "rabbitmq: waiting for a concurrent call")
			}
		}
		if g.m == nil {
			g.m = make(map[string]*flight)
		}
		f := &flight{done: make(chan struct{})}
		g.m[key] = f
		g.mu.Unlock()

		f.err = fn(ctx)
		f.abandoned = ctx.Err() != nil
		g.mu.Lock()
		delete(g.m, key)
		g.mu.Unlock()
		close(f.done)
		return f.err
	}
}
