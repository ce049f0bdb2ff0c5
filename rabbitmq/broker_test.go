package rabbitmq_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/rabbitmq"
	amqp "github.com/rabbitmq/amqp091-go"
)

func TestNewBroker(t *testing.T) {
	tests := []struct {
		name, url, user string
	}{
		{"ErrScheme", "amqp://guest:guest@127.0.0.1:15672", "guest"},
		{"ErrNoCredentials", "http://127.0.0.1:15672", "guest"},
		{"ErrNoHost", "http://guest:guest@", "guest"},
		{"ErrNoAMQPUser", "http://guest:guest@127.0.0.1:15672", ""},
		{"ErrBadURL", "http://guest:secret@127.0.0.1:bad port", "guest"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := rabbitmq.NewBroker(tt.url, tt.user)
			if err == nil {
				t.Fatal("want an error")
			}
			if strings.Contains(err.Error(), "secret") {
				t.Fatalf("error shows the password: %v", err)
			}
		})
	}
}

func TestBroker_InvalidNames(t *testing.T) {
	b, err := rabbitmq.NewBroker("http://guest:guest@127.0.0.1:1", "guest")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	long := strings.Repeat("x", 256)
	for name, err := range map[string]error{
		"PrepareLeafEmptyTree":  b.PrepareLeaf(ctx, "", "b", "l"),
		"PrepareLeafLongBranch": b.PrepareLeaf(ctx, "t", long, "l"),
		"GrantLeafDotDot":       b.GrantLeaf(ctx, "t", "..", "pw"),
		"GrantLeafNoPassword":   b.GrantLeaf(ctx, "t", "l", ""),
		"DeleteTreeEmptyLeaf":   b.DeleteTree(ctx, "t", []string{""}),
	} {
		if code := branchkey.ErrorCode(err); code != branchkey.EINVALID {
			t.Errorf("%s: code %q (%v), want %q", name, code, err, branchkey.EINVALID)
		}
	}
}

func TestBroker_Unreachable(t *testing.T) {
	// Nothing listens on port 1.
	b, err := rabbitmq.NewBroker("http://guest:guest@127.0.0.1:1", "guest", rabbitmq.WithRequestTimeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	err = b.PrepareLeaf(context.Background(), "t", "b", "l")
	if code := branchkey.ErrorCode(err); code != branchkey.EUNAVAILABLE {
		t.Fatalf("code %q (%v), want %q", code, err, branchkey.EUNAVAILABLE)
	}
	if !strings.Contains(err.Error(), `vhost "t"`) {
		t.Errorf("error does not name the vhost: %v", err)
	}
}

func TestBroker_PrepareLeaf(t *testing.T) {
	b := MustBroker(t)
	a := newAdmin(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))

	// Everything again, twice, changes nothing and fails nowhere.
	mustProvision(t, b, l)
	mustProvision(t, b, l)

	var ex struct {
		Type       string `json:"type"`
		Durable    bool   `json:"durable"`
		AutoDelete bool   `json:"auto_delete"`
	}
	a.do(t, http.MethodGet, &ex, "exchanges", tree, l.branch)
	if ex.Type != "fanout" || !ex.Durable || ex.AutoDelete {
		t.Errorf("exchange %s: %+v, want a durable fanout", l.branch, ex)
	}
	var q struct {
		Durable    bool `json:"durable"`
		AutoDelete bool `json:"auto_delete"`
		Exclusive  bool `json:"exclusive"`
	}
	a.do(t, http.MethodGet, &q, "queues", tree, l.id)
	if !q.Durable || q.AutoDelete || q.Exclusive {
		t.Errorf("queue %s: %+v, want durable", l.id, q)
	}
	var bindings []struct {
		Source     string `json:"source"`
		RoutingKey string `json:"routing_key"`
	}
	a.do(t, http.MethodGet, &bindings, "bindings", tree, "e", l.branch, "q", l.id)
	if len(bindings) != 1 {
		t.Errorf("bindings of %s to %s: %+v, want one", l.id, l.branch, bindings)
	}
	var user struct {
		Tags any `json:"tags"`
	}
	a.do(t, http.MethodGet, &user, "users", l.id)
	if tags := fmt.Sprint(user.Tags); tags != "[]" && tags != "" {
		t.Errorf("user %s has tags %v, want none", l.id, user.Tags)
	}
	var perms struct {
		Configure, Write, Read string
	}
	a.do(t, http.MethodGet, &perms, "permissions", tree, l.id)
	if want := (struct{ Configure, Write, Read string }{"^$", "^$", "^" + regexp.QuoteMeta(l.id) + "$"}); perms != want {
		t.Errorf("permissions of %s: %+v, want %+v", l.id, perms, want)
	}
	amqpURL, _ := testURLs(t)
	uri, _ := amqp.ParseURI(amqpURL)
	var server struct{ Configure, Write, Read string }
	a.do(t, http.MethodGet, &server, "permissions", tree, uri.Username)
	if server.Configure != ".*" || server.Write != ".*" || server.Read != ".*" {
		t.Errorf("permissions of the server user %s: %+v, want .* everywhere", uri.Username, server)
	}

	// The leaf can consume its queue with the token.
	conn := mustDialLeaf(t, l)
	if _, err := mustChannel(t, conn).Consume(l.id, "", false, false, false, false, nil); err != nil {
		t.Fatalf("consume own queue: %v", err)
	}
}

func TestBroker_GrantLeaf_NewToken(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))

	old := l
	l.token = uniqueName("token")
	if err := b.GrantLeaf(context.Background(), l.tree, l.id, l.token); err != nil {
		t.Fatal(err)
	}
	mustDialLeaf(t, l)
	if _, err := dialLeaf(t, old); err == nil {
		t.Fatal("the replaced token still connects")
	}
}

// TestBroker_ManyLeaves provisions a login storm: 200 leaves of two branches
// at once. Each then gets its branch's message with its own credentials.
func TestBroker_ManyLeaves(t *testing.T) {
	const nLeaves = 200
	amqpURL, _ := testURLs(t)
	b := MustBroker(t)
	var ids []string
	tree := MustTree(t, b, &ids)
	branches := []string{uniqueName("branch"), uniqueName("branch")}
	leaves := make([]leaf, nLeaves)
	for i := range leaves {
		leaves[i] = leaf{tree: tree, branch: branches[i%2], id: uniqueName("leaf"), token: uniqueName("token")}
		ids = append(ids, leaves[i].id)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, nLeaves)
	for i, l := range leaves {
		wg.Go(func() {
			if err := b.PrepareLeaf(ctx, l.tree, l.branch, l.id); err != nil {
				errs[i] = err
				return
			}
			errs[i] = b.GrantLeaf(ctx, l.tree, l.id, l.token)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("leaf %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("provisioned %d leaves concurrently in %s", nLeaves, time.Since(start).Round(time.Millisecond))

	n := MustNotifier(t)
	msgs := make(map[string]string)
	for _, br := range branches {
		m := newMessage(leaf{tree: tree, branch: br}, branchkey.MessageRunStatus, `{"run_status":"start"}`)
		mustPublish(t, n, m)
		msgs[br] = m.ID
	}

	sem := make(chan struct{}, 20)
	for _, l := range leaves {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := getOne(amqpURL, l, msgs[l.branch]); err != nil {
				t.Errorf("leaf %s: %v", l.id, err)
			}
		})
	}
	wg.Wait()
}

// getOne connects as l, gets one message from its queue, acks it, and
// checks its id.
func getOne(amqpURL string, l leaf, wantID string) error {
	conn, err := amqp.DialConfig(amqpURL, amqp.Config{
		Vhost: l.tree,
		SASL:  []amqp.Authentication{&amqp.PlainAuth{Username: l.id, Password: l.token}},
	})
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		d, ok, err := ch.Get(l.id, false)
		if err != nil {
			return fmt.Errorf("get: %w", err)
		}
		if ok {
			if d.MessageId != wantID {
				return fmt.Errorf("got message %s, want %s", d.MessageId, wantID)
			}
			return d.Ack(false)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no message in queue %s", l.id)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestBroker_LeafAccessRefused checks a leaf's credentials allow consuming
// its own queue and nothing else.
func TestBroker_LeafAccessRefused(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	branch := uniqueName("branch")
	l := MustLeaf(t, b, tree, branch)
	other := MustLeaf(t, b, tree, branch)
	conn := mustDialLeaf(t, l)

	tests := []struct {
		name string
		do   func(ch *amqp.Channel) error
	}{
		{"ConsumeOtherQueue", func(ch *amqp.Channel) error {
			_, err := ch.Consume(other.id, "", false, false, false, false, nil)
			return err
		}},
		{"GetOtherQueue", func(ch *amqp.Channel) error {
			_, _, err := ch.Get(other.id, false)
			return err
		}},
		{"DeclareQueue", func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclare(uniqueName("queue"), false, true, false, false, nil)
			return err
		}},
		{"DeclareOwnQueue", func(ch *amqp.Channel) error {
			_, err := ch.QueueDeclare(l.id, true, false, false, false, nil)
			return err
		}},
		{"DeclareExchange", func(ch *amqp.Channel) error {
			return ch.ExchangeDeclare(uniqueName("exchange"), "fanout", false, true, false, false, nil)
		}},
		{"BindOwnQueue", func(ch *amqp.Channel) error {
			return ch.QueueBind(l.id, "", "amq.fanout", false, nil)
		}},
		{"DeleteOwnQueue", func(ch *amqp.Channel) error {
			_, err := ch.QueueDelete(l.id, false, false, false)
			return err
		}},
		{"PublishToBranch", func(ch *amqp.Channel) error {
			return publishAsLeaf(ch, branch, "")
		}},
		{"PublishToDefaultExchange", func(ch *amqp.Channel) error {
			return publishAsLeaf(ch, "", other.id)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := mustChannel(t, conn)
			err := tt.do(ch)
			if code := amqpCode(err); code != amqp.AccessRefused {
				t.Fatalf("got %v (code %d), want ACCESS_REFUSED (403)", err, code)
			}
		})
	}

	t.Run("OtherTree", func(t *testing.T) {
		elsewhere := MustLeaf(t, b, MustTree(t, b, nil), uniqueName("branch"))
		l := l
		l.tree = elsewhere.tree
		if _, err := dialLeaf(t, l); err == nil {
			t.Fatal("a leaf connects to another tree's vhost")
		}
	})
	t.Run("ConsumeOwnQueue", func(t *testing.T) {
		if _, err := mustChannel(t, conn).Consume(l.id, "", false, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
	})
}

// publishAsLeaf publishes in confirm mode and returns the error the broker
// closed the channel with, if it did.
func publishAsLeaf(ch *amqp.Channel, exchange, key string) error {
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	if err := ch.Confirm(false); err != nil {
		return err
	}
	dc, err := ch.PublishWithDeferredConfirm(exchange, key, false, false, amqp.Publishing{Body: []byte("{}")})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if ok, err := dc.WaitContext(ctx); err != nil || ok {
		return fmt.Errorf("publish was not refused: acked=%v err=%v", ok, err)
	}
	select {
	case err := <-closed:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TestBroker_Escaping uses names that need escaping in URLs and quoting in
// permission regexps.
func TestBroker_Escaping(t *testing.T) {
	amqpURL, _ := testURLs(t)
	b := MustBroker(t)
	var ids []string
	tree := "bktest tree/" + uniqueName("x")
	t.Cleanup(func() {
		if err := b.DeleteTree(context.Background(), tree, ids); err != nil {
			t.Errorf("delete tree: %v", err)
		}
	})
	branch := "branch/" + uniqueName("x") + " +%"
	base := uniqueName("leaf")
	dotted := leaf{tree: tree, branch: branch, id: base + ".a", token: uniqueName("token")}
	plain := leaf{tree: tree, branch: branch, id: base + "xa", token: uniqueName("token")}
	ids = []string{dotted.id, plain.id}
	mustProvision(t, b, dotted)
	mustProvision(t, b, plain)

	n := MustNotifier(t)
	m := newMessage(dotted, branchkey.MessageRunStatus, `{"run_status":"pause"}`)
	mustPublish(t, n, m)
	if err := getOne(amqpURL, dotted, m.ID); err != nil {
		t.Fatal(err)
	}
	// "^<base>.a$" unquoted would match "<base>xa".
	conn := mustDialLeaf(t, dotted)
	_, err := mustChannel(t, conn).Consume(plain.id, "", false, false, false, false, nil)
	if code := amqpCode(err); code != amqp.AccessRefused {
		t.Fatalf("consume %s as %s: %v, want ACCESS_REFUSED", plain.id, dotted.id, err)
	}
}

func TestBroker_RevokeLeaf(t *testing.T) {
	amqpURL, _ := testURLs(t)
	b := MustBroker(t)
	a := newAdmin(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)
	ctx := context.Background()

	conn := mustDialLeaf(t, l)
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
	if _, err := mustChannel(t, conn).Consume(l.id, "", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	// Revoked right away: the broker lists a connection as soon as it is open.
	if err := b.RevokeLeaf(ctx, tree, l.id); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-closed:
		if err == nil || err.Code != amqp.ConnectionForced {
			t.Errorf("connection closed with %v, want CONNECTION_FORCED", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the leaf's open connection survived RevokeLeaf")
	}
	if _, err := dialLeaf(t, l); err == nil {
		t.Fatal("the revoked token still connects")
	}
	if a.exists(t, "users", l.id) {
		t.Error("the revoked user still exists")
	}
	if err := b.RevokeLeaf(ctx, tree, l.id); err != nil {
		t.Fatalf("revoke again: %v", err)
	}

	// The queue stays: what is published meanwhile waits for the next login.
	m := newMessage(l, branchkey.MessageAggregationStatus, `{"aggregation_id":"a1"}`)
	mustPublish(t, n, m)
	l.token = uniqueName("token")
	mustProvision(t, b, l)
	if err := getOne(amqpURL, l, m.ID); err != nil {
		t.Fatal(err)
	}
}

func TestBroker_Delete(t *testing.T) {
	b := MustBroker(t)
	a := newAdmin(t)
	ctx := context.Background()
	var all []string
	tree := MustTree(t, b, &all)
	branchA, branchB := uniqueName("branch"), uniqueName("branch")
	a1, a2, b1 := MustLeaf(t, b, tree, branchA), MustLeaf(t, b, tree, branchA), MustLeaf(t, b, tree, branchB)
	all = []string{a1.id, a2.id, b1.id}
	conn := mustDialLeaf(t, a1)
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))

	leafExists := func(l leaf) (user, queue bool) {
		return a.exists(t, "users", l.id), a.exists(t, "queues", tree, l.id)
	}

	t.Run("DeleteLeaf", func(t *testing.T) {
		for range 2 {
			if err := b.DeleteLeaf(ctx, tree, branchA, a1.id); err != nil {
				t.Fatal(err)
			}
		}
		if u, q := leafExists(a1); u || q {
			t.Errorf("after DeleteLeaf: user %v, queue %v, want neither", u, q)
		}
		if u, q := leafExists(a2); !u || !q {
			t.Errorf("another leaf: user %v, queue %v, want both", u, q)
		}
		if !a.exists(t, "exchanges", tree, branchA) {
			t.Error("the branch's exchange went with its leaf")
		}
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Error("the deleted leaf's connection is still open")
		}
	})
	t.Run("DeleteBranch", func(t *testing.T) {
		for range 2 {
			if err := b.DeleteBranch(ctx, tree, branchA, []string{a1.id, a2.id}); err != nil {
				t.Fatal(err)
			}
		}
		if a.exists(t, "exchanges", tree, branchA) {
			t.Error("the exchange survived DeleteBranch")
		}
		if u, q := leafExists(a2); u || q {
			t.Errorf("after DeleteBranch: user %v, queue %v, want neither", u, q)
		}
		if u, q := leafExists(b1); !u || !q || !a.exists(t, "exchanges", tree, branchB) {
			t.Error("DeleteBranch touched another branch")
		}
	})
	t.Run("DeleteTree", func(t *testing.T) {
		for range 2 {
			if err := b.DeleteTree(ctx, tree, []string{b1.id}); err != nil {
				t.Fatal(err)
			}
		}
		if a.exists(t, "vhosts", tree) {
			t.Error("the vhost survived DeleteTree")
		}
		if a.exists(t, "users", b1.id) {
			t.Error("the leaf's user survived DeleteTree")
		}
	})
}

// TestBroker_PrepareLeaf_Replicas has four Brokers, as four server
// replicas would, provision leaves of one new tree and branch at once.
func TestBroker_PrepareLeaf_Replicas(t *testing.T) {
	amqpURL, _ := testURLs(t)
	var ids []string
	tree := MustTree(t, MustBroker(t), &ids)
	branch := uniqueName("branch")
	var leaves []leaf
	for range 20 {
		l := leaf{tree: tree, branch: branch, id: uniqueName("leaf"), token: uniqueName("token")}
		leaves = append(leaves, l)
		ids = append(ids, l.id)
	}
	replicas := []*rabbitmq.Broker{MustBroker(t), MustBroker(t), MustBroker(t), MustBroker(t)}
	var wg sync.WaitGroup
	for i, l := range leaves {
		wg.Go(func() {
			b := replicas[i%len(replicas)]
			for range 2 { // and again, idempotently
				if err := b.PrepareLeaf(context.Background(), l.tree, l.branch, l.id); err != nil {
					t.Errorf("leaf %d: %v", i, err)
					return
				}
			}
			if err := b.GrantLeaf(context.Background(), l.tree, l.id, l.token); err != nil {
				t.Errorf("leaf %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	m := newMessage(leaves[0], branchkey.MessageRunStatus, `{"run_status":"start"}`)
	mustPublish(t, MustNotifier(t), m)
	for _, l := range leaves {
		if err := getOne(amqpURL, l, m.ID); err != nil {
			t.Errorf("leaf %s: %v", l.id, err)
		}
	}
}

// TestBroker_PrepareLeaf_Cancelled races callers that give up with callers
// that do not, on one new tree: the first fail with EUNAVAILABLE wrapping
// their context's error, the others succeed.
func TestBroker_PrepareLeaf_Cancelled(t *testing.T) {
	b := MustBroker(t)
	var ids []string
	tree := MustTree(t, b, &ids)
	branch := uniqueName("branch")
	for i := range 20 {
		ids = append(ids, fmt.Sprintf("%s-%d", uniqueName("leaf"), i))
	}
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			ctx := context.Background()
			if i%2 == 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				if i%4 == 0 {
					cancel()
				} else {
					time.AfterFunc(time.Duration(i)*time.Millisecond, cancel)
				}
			}
			err := b.PrepareLeaf(ctx, tree, branch, id)
			switch {
			case i%2 == 1 && err != nil:
				t.Errorf("leaf %d, not cancelled: %v", i, err)
			case err != nil && (branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE || !errors.Is(err, context.Canceled)):
				t.Errorf("leaf %d, cancelled: %v, want EUNAVAILABLE wrapping context.Canceled", i, err)
			}
		})
	}
	wg.Wait()
}

var _ branchkey.Broker = (*rabbitmq.Broker)(nil)
