package client

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/branchkey/branchkey"
)

// DefaultServer is the server a Client talks to unless WithServer says
// otherwise.
const DefaultServer = "http://127.0.0.1:8080"

// DefaultDownloadDir is where FileDownload writes, as the Python client
// does: ./aggregated_files/<file id>.
const DefaultDownloadDir = "aggregated_files"

// DefaultStallTimeout is how long a transfer or an event stream may move no
// byte before the connection is given up and retried.
const DefaultStallTimeout = 2 * time.Minute

// Transport says where notifications come from.
type Transport string

// The notification transports. TransportAuto uses AMQP when the
// credentials name a broker host and Server-Sent Events otherwise.
const (
	TransportAuto Transport = ""
	TransportAMQP Transport = "amqp"
	TransportSSE  Transport = "sse"
)

// Session is a logged-in leaf: its id and access token, as login returned
// them. A session can be saved and given back to a later Client with
// WithSession, so that a new process does not log in again (each login
// issues a new token and makes it the broker password).
type Session struct {
	LeafID      string    `json:"leaf_id"`
	AccessToken string    `json:"access_token"`
	CreatedAt   time.Time `json:"created_at"`
}

// RunState is a branch's training run as the server reports it.
type RunState struct {
	Status branchkey.RunStatus `json:"run_status"`
	Run    int                 `json:"run_number"`
	Round  int                 `json:"round"`
}

// Client is a leaf of a branchkey server: it logs in and out, uploads and
// downloads weights files and receives notifications. It is safe for
// concurrent use.
//
// File calls log in by themselves when the client has no session yet, and
// log in again once when the server answers 401 (the token expired or was
// revoked). Login also starts the consumer that feeds Updates.
type Client struct {
	creds      Credentials
	server     string
	http       *http.Client
	ownHTTP    bool
	log        *slog.Logger
	dir        string
	retry      RetryPolicy
	stall      time.Duration
	progress   func(Progress)
	transport  Transport
	noConsumer bool
	bufSize    int

	// loginMu serialises logins, so that concurrent 401s log in once.
	loginMu sync.Mutex

	mu        sync.Mutex
	sess      *Session
	adopted   bool // sess came from WithSession and Login has not run yet
	runStatus branchkey.RunStatus
	lastEvent string // the SSE cursor: the last event id delivered
	// retryAfterSSE is the reconnection time the event stream asked for.
	retryAfterSSE time.Duration
	// seen holds the AMQP message ids delivered lately.
	seen    *seenIDs
	updates chan Notification
	started bool // a consumer was started on updates
	stop    context.CancelFunc
	done    chan struct{}
	err     error
}

// Option configures a Client.
type Option func(*Client)

// WithServer sets the server's base URL (default DefaultServer).
func WithServer(url string) Option { return func(c *Client) { c.server = url } }

// WithHTTPClient sends every HTTP request with hc. Its Timeout should be 0:
// a large transfer may take long, and the client bounds stalls itself (see
// WithStallTimeout). The default client uses a clone of
// http.DefaultTransport.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.http = hc } }

// WithDownloadDir sets the directory FileDownload writes to (default
// DefaultDownloadDir, relative to the working directory).
func WithDownloadDir(dir string) Option { return func(c *Client) { c.dir = dir } }

// WithLogger makes the client log retries, reconnections and dropped
// messages to l (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *Client) { c.log = l } }

// WithRetry sets how transient failures are retried (default
// DefaultRetryPolicy).
func WithRetry(p RetryPolicy) Option { return func(c *Client) { c.retry = p } }

// WithStallTimeout sets how long an upload, a download or an event stream
// may move no byte before its connection is dropped and the call retried
// (default DefaultStallTimeout). The server sends a heartbeat on idle
// event streams every 15s, so keep it well above that.
func WithStallTimeout(d time.Duration) Option { return func(c *Client) { c.stall = d } }

// WithProgress calls fn as uploads and downloads move bytes. fn is called
// from the goroutine of the call it reports on and should return quickly.
func WithProgress(fn func(Progress)) Option { return func(c *Client) { c.progress = fn } }

// WithSession starts the client with a saved session instead of logging in
// again: Login adopts it without contacting the server, and it is replaced
// by a new login the first time the server refuses it.
func WithSession(s Session) Option {
	return func(c *Client) {
		if s.LeafID != "" && s.AccessToken != "" {
			c.sess, c.adopted = &s, true
		}
	}
}

// WithLastEventID makes the Server-Sent Events consumer resume after the
// event with that id (a Notification.ID it delivered before), instead of
// receiving the branch's messages from the first. AMQP ignores it: the
// leaf's queue keeps what was not consumed.
func WithLastEventID(id string) Option { return func(c *Client) { c.lastEvent = id } }

// WithTransport forces where notifications come from (default
// TransportAuto).
func WithTransport(t Transport) Option { return func(c *Client) { c.transport = t } }

// WithoutConsumer makes Login only log in: no notification consumer runs
// and Updates stays silent. The CLI's one-shot commands use it, so they do
// not take messages off the leaf's queue.
func WithoutConsumer() Option { return func(c *Client) { c.noConsumer = true } }

// WithUpdatesBuffer gives the Updates channel a buffer of n notifications
// (default 0). A message counts as delivered, and is acknowledged to the
// broker, once it is in the channel: with a buffer, messages that were
// buffered but never read are lost when the program exits.
func WithUpdatesBuffer(n int) Option { return func(c *Client) { c.bufSize = max(n, 0) } }

// New returns a client for a leaf. It checks the credentials and options
// but does not contact the server.
func New(creds Credentials, opts ...Option) (*Client, error) {
	c := &Client{creds: creds, server: DefaultServer, dir: DefaultDownloadDir, retry: DefaultRetryPolicy, stall: DefaultStallTimeout}
	for _, o := range opts {
		o(c)
	}
	if err := creds.Validate(); err != nil {
		return nil, err
	}
	u, err := url.Parse(c.server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, clientError(branchkey.EINVALID, "server %q is not an http(s):// URL", c.server)
	}
	c.server = strings.TrimRight(c.server, "/")
	switch c.transport {
	case TransportAuto, TransportSSE:
	case TransportAMQP:
		if creds.BrokerHost() == "" {
			return nil, clientError(branchkey.EINVALID, "notifications over AMQP need a broker host: the credentials have no host or response_host")
		}
	default:
		return nil, clientError(branchkey.EINVALID, "unknown notification transport %q: use amqp or sse", c.transport)
	}
	if c.log == nil {
		c.log = slog.New(slog.DiscardHandler)
	}
	c.log = c.log.WithGroup("client")
	c.retry = c.retry.withDefaults()
	if c.stall <= 0 {
		c.stall = DefaultStallTimeout
	}
	if c.dir == "" {
		c.dir = DefaultDownloadDir
	}
	if c.http == nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
		// After an upload's last byte the server commits the file and
		// records it; that takes seconds even for gigabytes.
		t.ResponseHeaderTimeout = 5 * time.Minute
		c.http, c.ownHTTP = &http.Client{Transport: t}, true
	}
	c.updates = make(chan Notification, c.bufSize)
	return c, nil
}

// Credentials returns the client's credentials.
func (c *Client) Credentials() Credentials { return c.creds }

// Server returns the server's base URL.
func (c *Client) Server() string { return c.server }

// DownloadDir returns the directory FileDownload writes to.
func (c *Client) DownloadDir() string { return c.dir }

// Session returns the current session, or nil before the first login.
func (c *Client) Session() *Session {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sess == nil {
		return nil
	}
	s := *c.sess
	return &s
}

// LastEventID returns the id of the last notification delivered on
// Updates, or what WithLastEventID set: the cursor to resume from.
func (c *Client) LastEventID() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastEvent
}

// Transport returns where the client's notifications come from:
// TransportAMQP or TransportSSE.
func (c *Client) Transport() Transport {
	if c.transport == TransportAuto {
		if c.creds.BrokerHost() != "" {
			return TransportAMQP
		}
		return TransportSSE
	}
	return c.transport
}

// Login logs the leaf in (PUT /v1/leaf/login) and starts the consumer that
// delivers notifications on Updates, over AMQP when the credentials name a
// broker host and over Server-Sent Events otherwise. A session given with
// WithSession is adopted instead of logging in, the first time. The
// consumer runs, reconnecting as needed, until Logout or Close, whatever
// happens to ctx; ctx bounds the login only. Read Updates: the consumer
// waits for each notification to be taken (with AMQP, the broker then
// holds the next ones). A program that only moves files should use
// WithoutConsumer, or not call Login at all: file calls log in by
// themselves.
//
// Errors: EUNAUTHORIZED for a wrong name or password, EFORBIDDEN when the
// tree or branch is not the leaf's, EUNAVAILABLE when the server or the
// broker it provisions cannot be reached (after retries).
func (c *Client) Login(ctx context.Context) error {
	c.mu.Lock()
	adopt := c.adopted
	c.adopted = false
	c.mu.Unlock()
	if !adopt {
		if err := c.retrying(ctx, func() error { return c.login(ctx) }); err != nil {
			return fmt.Errorf("login leaf %s: %w", c.creds.LeafName, err)
		}
	}
	if _, err := c.FetchRunStatus(ctx); err != nil {
		if isUnauthorized(err) || ctx.Err() != nil {
			return fmt.Errorf("login leaf %s: %w", c.creds.LeafName, err)
		}
		c.log.Warn("read the run status after login", "err", err)
	}
	if !c.noConsumer {
		c.startConsumer(ctx)
	}
	return nil
}

// login sends one login request and keeps the session it returns.
func (c *Client) login(ctx context.Context) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	return c.loginLocked(ctx)
}

func (c *Client) loginLocked(ctx context.Context) error {
	body, _ := json.Marshal(map[string]string{"tree_id": c.creds.TreeID, "branch_id": c.creds.BranchID})
	var out struct {
		ID          string `json:"id"`
		AccessToken string `json:"access_token"`
	}
	if err := c.doJSON(ctx, http.MethodPut, "/v1/leaf/login", body, c.creds.LeafName, c.creds.LeafPassword, http.StatusCreated, &out); err != nil {
		return err
	}
	if out.ID == "" || out.AccessToken == "" {
		return &Error{Status: http.StatusCreated, Code: branchkey.EINTERNAL, Message: "the login answer has no id or access_token"}
	}
	c.mu.Lock()
	c.sess = &Session{LeafID: out.ID, AccessToken: out.AccessToken, CreatedAt: time.Now().UTC()}
	c.mu.Unlock()
	c.log.Debug("logged in", "leaf", out.ID, "name", c.creds.LeafName)
	return nil
}

// session returns the current session, logging in first if there is none.
func (c *Client) session(ctx context.Context) (*Session, error) {
	c.mu.Lock()
	s := c.sess
	c.mu.Unlock()
	if s != nil {
		return s, nil
	}
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	c.mu.Lock()
	s = c.sess
	c.mu.Unlock()
	if s != nil {
		return s, nil
	}
	if err := c.loginLocked(ctx); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sess, nil
}

// relogin logs in again because the server refused stale, unless another
// caller already replaced it.
func (c *Client) relogin(ctx context.Context, stale *Session) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	c.mu.Lock()
	current := c.sess
	c.mu.Unlock()
	if current != stale {
		return nil
	}
	c.log.Info("the server refused the session; logging in again", "leaf", c.creds.LeafName)
	return c.loginLocked(ctx)
}

// retrying runs fn until it succeeds, fails for good, or the retry policy
// is spent.
func (c *Client) retrying(ctx context.Context, fn func() error) error {
	for attempt := 0; ; attempt++ {
		err := fn()
		if err == nil || !retryable(ctx, err) || attempt+1 >= c.retry.Attempts {
			return err
		}
		d := c.retry.backoff(attempt, err)
		c.log.Warn("retrying after a transient failure", "attempt", attempt+1, "wait", d, "err", err)
		if err := sleep(ctx, d); err != nil {
			return err
		}
	}
}

// call runs fn with a session, retrying transient failures and logging in
// again once when the server refuses the session.
func (c *Client) call(ctx context.Context, fn func(*Session) error) error {
	relogged := false
	return c.retrying(ctx, func() error {
		for {
			s, err := c.session(ctx)
			if err != nil {
				return err
			}
			err = fn(s)
			if !isUnauthorized(err) || relogged {
				return err
			}
			relogged = true
			if err := c.relogin(ctx, s); err != nil {
				return err
			}
		}
	})
}

// newRequest returns a request to the server with the client's common
// headers and Basic auth.
func (c *Client) newRequest(ctx context.Context, method, path string, body io.Reader, user, password string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.server+path, body)
	if err != nil {
		return nil, err
	}
	req.SetBasicAuth(user, password)
	req.Header.Set("User-Agent", "branchkey-go/"+branchkey.Version)
	return req, nil
}

// doJSON sends a small request and decodes the answer's "data" into out.
// An answer other than want is an error.
func (c *Client) doJSON(ctx context.Context, method, path string, body []byte, user, password string, want int, out any) error {
	var r io.Reader
	if body != nil {
		r = strings.NewReader(string(body))
	}
	req, err := c.newRequest(ctx, method, path, r, user, password)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return transportError(ctx, ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != want {
		return errorFrom(resp)
	}
	return decodeData(resp, out)
}

// decodeData decodes the "data" of a JSON answer into out.
func decodeData(resp *http.Response, out any) error {
	if out == nil {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		return nil
	}
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&env); err != nil {
		return &Error{Status: resp.StatusCode, Code: branchkey.EINTERNAL, Message: fmt.Sprintf("the answer is not JSON: %v", err)}
	}
	if err := json.Unmarshal(env.Data, out); err != nil {
		return &Error{Status: resp.StatusCode, Code: branchkey.EINTERNAL, Message: fmt.Sprintf("unexpected answer %s: %v", env.Data, err)}
	}
	return nil
}

// Logout stops the consumer and logs the leaf out (PUT /v1/leaf/logout,
// with the leaf's name and password): every token of the leaf stops
// working, on HTTP and on the broker. The client can log in again.
//
// Errors: EUNAUTHORIZED for a wrong name or password.
func (c *Client) Logout(ctx context.Context) error {
	c.stopConsumer()
	err := c.retrying(ctx, func() error {
		return c.doJSON(ctx, http.MethodPut, "/v1/leaf/logout", nil, c.creds.LeafName, c.creds.LeafPassword, http.StatusOK, nil)
	})
	if err != nil {
		return fmt.Errorf("logout leaf %s: %w", c.creds.LeafName, err)
	}
	c.mu.Lock()
	c.sess, c.adopted = nil, false
	c.mu.Unlock()
	return nil
}

// Close stops the consumer, if it runs, without logging out, and closes
// idle connections. The session stays valid (see Session).
func (c *Client) Close() error {
	c.stopConsumer()
	if c.ownHTTP {
		c.http.CloseIdleConnections()
	}
	return nil
}

// RunStatus returns the branch's run state as last seen: at login, by
// FetchRunStatus, or in a run_status notification. It is "" before any.
func (c *Client) RunStatus() branchkey.RunStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.runStatus
}

// FetchRunStatus asks the server for the branch's run state
// (GET /v1/branch/{branch_id}/run).
//
// Errors: EUNAUTHORIZED when logging in fails.
func (c *Client) FetchRunStatus(ctx context.Context) (*RunState, error) {
	var st RunState
	err := c.call(ctx, func(s *Session) error {
		return c.doJSON(ctx, http.MethodGet, "/v1/branch/"+url.PathEscape(c.creds.BranchID)+"/run", nil, s.LeafID, s.AccessToken, http.StatusOK, &st)
	})
	if err != nil {
		return nil, fmt.Errorf("run status of branch %s: %w", c.creds.BranchID, err)
	}
	c.mu.Lock()
	c.runStatus = st.Status
	c.mu.Unlock()
	return &st, nil
}
