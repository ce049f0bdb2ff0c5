package rabbitmq_test

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/rabbitmq"
	amqp "github.com/rabbitmq/amqp091-go"
)

var _ branchkey.Notifier = (*rabbitmq.Notifier)(nil)

func TestNotifier_Publish(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)

	// Consume as the published client does: manual acks, no declarations.
	ch := mustChannel(t, mustDialLeaf(t, l))
	deliveries, err := ch.Consume(l.id, "", false, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}

	m := newMessage(l, branchkey.MessageAggregationStatus, `{"aggregation_id":"agg-1","round":3}`)
	mustPublish(t, n, m)

	select {
	case d := <-deliveries:
		if d.MessageId != m.ID {
			t.Errorf("message_id %q, want %q", d.MessageId, m.ID)
		}
		if d.DeliveryMode != amqp.Persistent {
			t.Errorf("delivery mode %d, want persistent (2)", d.DeliveryMode)
		}
		if d.ContentType != "application/json" {
			t.Errorf("content type %q", d.ContentType)
		}
		if d.Type != branchkey.MessageAggregationStatus {
			t.Errorf("type %q", d.Type)
		}
		if !d.Timestamp.Equal(m.CreatedAt) {
			t.Errorf("timestamp %v, want %v", d.Timestamp, m.CreatedAt)
		}
		if got, want := string(d.Body), string(m.Payload()); got != want {
			t.Errorf("body %s, want %s", got, want)
		}
		if d.Exchange != l.branch {
			t.Errorf("exchange %q, want %q", d.Exchange, l.branch)
		}
		if err := d.Ack(false); err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the leaf got nothing")
	}
}

// TestNotifier_Publish_Branch checks every leaf of the branch, and no other,
// gets a message.
func TestNotifier_Publish_Branch(t *testing.T) {
	amqpURL, _ := testURLs(t)
	b := MustBroker(t)
	a := newAdmin(t)
	tree := MustTree(t, b, nil)
	branch := uniqueName("branch")
	l1, l2 := MustLeaf(t, b, tree, branch), MustLeaf(t, b, tree, branch)
	stranger := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)

	m := newMessage(l1, branchkey.MessageRunStatus, `{"run_status":"stop"}`)
	mustPublish(t, n, m)
	for _, l := range []leaf{l1, l2} {
		if err := getOne(amqpURL, l, m.ID); err != nil {
			t.Errorf("leaf %s: %v", l.id, err)
		}
	}
	var q struct {
		Messages int `json:"messages"`
	}
	a.do(t, http.MethodGet, &q, "queues", tree, stranger.id)
	if q.Messages != 0 {
		t.Errorf("a leaf of another branch has %d messages", q.Messages)
	}
}

// TestNotifier_Publish_Concurrent publishes from many goroutines at once.
func TestNotifier_Publish_Concurrent(t *testing.T) {
	const nMsgs = 300
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)

	ids := make([]string, nMsgs)
	var wg sync.WaitGroup
	for i := range nMsgs {
		wg.Go(func() {
			m := newMessage(l, branchkey.MessageRunStatus, `{"run_status":"start"}`)
			if i%2 == 0 {
				m.Type = branchkey.MessageAggregationStatus
				m.Body = []byte(`{"aggregation_id":"x"}`)
			}
			ids[i] = m.ID
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := n.Publish(ctx, m); err != nil {
				t.Errorf("publish %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	want := make(map[string]bool)
	for _, id := range ids {
		want[id] = true
	}
	deliveries, err := mustChannel(t, mustDialLeaf(t, l)).Consume(l.id, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	for len(want) > 0 {
		select {
		case d := <-deliveries:
			if !want[d.MessageId] {
				t.Fatalf("unexpected or duplicate message %q", d.MessageId)
			}
			delete(want, d.MessageId)
		case <-time.After(10 * time.Second):
			t.Fatalf("%d of %d confirmed messages never arrived", len(want), nMsgs)
		}
	}
}

func TestNotifier_Publish_NotFound(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)
	ctx := context.Background()

	t.Run("Exchange", func(t *testing.T) {
		m := newMessage(leaf{tree: tree, branch: uniqueName("branch")}, branchkey.MessageRunStatus, `{}`)
		if err := n.Publish(ctx, m); branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
			t.Fatalf("got %v, want ENOTFOUND", err)
		}
		// The missing exchange did not break the vhost's channel.
		mustPublish(t, n, newMessage(l, branchkey.MessageRunStatus, `{}`))
	})
	t.Run("Vhost", func(t *testing.T) {
		m := newMessage(leaf{tree: uniqueName("tree"), branch: "b"}, branchkey.MessageRunStatus, `{}`)
		for range 2 {
			if err := n.Publish(ctx, m); branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
				t.Fatalf("got %v, want ENOTFOUND", err)
			}
		}
	})
	t.Run("ExchangeDeleted", func(t *testing.T) {
		gone := MustLeaf(t, b, tree, uniqueName("branch"))
		mustPublish(t, n, newMessage(gone, branchkey.MessageRunStatus, `{}`))
		if err := b.DeleteBranch(ctx, tree, gone.branch, []string{gone.id}); err != nil {
			t.Fatal(err)
		}
		// The first publish finds out by the channel closing; later ones
		// check again and say what is missing.
		m := newMessage(gone, branchkey.MessageRunStatus, `{}`)
		var err error
		for range 2 {
			if err = n.Publish(ctx, m); branchkey.ErrorCode(err) == branchkey.ENOTFOUND {
				break
			} else if branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
				t.Fatalf("got %v, want EUNAVAILABLE or ENOTFOUND", err)
			}
		}
		if branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
			t.Fatalf("got %v, want ENOTFOUND", err)
		}
		mustPublish(t, n, newMessage(l, branchkey.MessageRunStatus, `{}`))
	})
}

func TestNotifier_Publish_Invalid(t *testing.T) {
	n, err := rabbitmq.NewNotifier("amqp://guest:guest@127.0.0.1:1/", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	for name, m := range map[string]*branchkey.Message{
		"Nil":      nil,
		"NoTree":   {ID: "m", BranchID: "b"},
		"NoBranch": {ID: "m", TreeID: "t"},
		"NoID":     {TreeID: "t", BranchID: "b"},
	} {
		if err := n.Publish(context.Background(), m); branchkey.ErrorCode(err) != branchkey.EINVALID {
			t.Errorf("%s: got %v, want EINVALID", name, err)
		}
	}
}

func TestNewNotifier_ErrURL(t *testing.T) {
	for _, u := range []string{"http://guest:secret@127.0.0.1/", "amqp://guest:secret@127.0.0.1:bad/"} {
		_, err := rabbitmq.NewNotifier(u, nil)
		if err == nil {
			t.Errorf("%s: want an error", u)
		}
	}
}

// TestNotifier_Unreachable checks Publish fails with EUNAVAILABLE, before
// its context ends, while nothing answers.
func TestNotifier_Unreachable(t *testing.T) {
	tests := []struct {
		name, url string
	}{
		{"Refused", "amqp://guest:guest@127.0.0.1:1/"},
		// A TEST-NET-1 address: nothing answers, or the route is refused.
		{"Silent", "amqp://guest:guest@192.0.2.1:5672/"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := rabbitmq.NewNotifier(tt.url, testLogger(t), rabbitmq.WithDialTimeout(500*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			defer n.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			m := &branchkey.Message{ID: "m1", TreeID: "t", BranchID: "b", Type: branchkey.MessageRunStatus, Body: []byte(`{}`)}
			// The second attempt falls within the backoff.
			for i := range 3 {
				err := n.Publish(ctx, m)
				if code := branchkey.ErrorCode(err); code != branchkey.EUNAVAILABLE {
					t.Fatalf("attempt %d: got %v, want EUNAVAILABLE", i, err)
				}
				if ctx.Err() != nil {
					t.Fatalf("attempt %d: Publish took until its context ended", i)
				}
			}
		})
	}
}

// TestNotifier_Reconnect has the broker close the notifier's connection,
// then checks the next publishes open another.
func TestNotifier_Reconnect(t *testing.T) {
	amqpURL, _ := testURLs(t)
	b := MustBroker(t)
	a := newAdmin(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t, rabbitmq.WithReconnectBackoff(10*time.Millisecond, 200*time.Millisecond))
	mustPublish(t, n, newMessage(l, branchkey.MessageRunStatus, `{}`))

	type conn struct {
		Name             string `json:"name"`
		ClientProperties struct {
			ConnectionName string `json:"connection_name"`
		} `json:"client_properties"`
	}
	var conns []conn
	if !eventually(10*time.Second, func() bool {
		a.do(t, http.MethodGet, &conns, "vhosts", tree, "connections")
		return len(conns) == 1
	}) {
		t.Fatalf("the notifier's connections to %s: %+v, want one", tree, conns)
	}
	if got := conns[0].ClientProperties.ConnectionName; got != "branchkey notifier "+tree {
		t.Errorf("connection name %q", got)
	}
	if st := a.do(t, http.MethodDelete, nil, "connections", conns[0].Name); st != http.StatusNoContent {
		t.Fatalf("close the notifier's connection: status %d", st)
	}

	m := newMessage(l, branchkey.MessageRunStatus, `{"run_status":"pause"}`)
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := n.Publish(context.Background(), m)
		if err == nil {
			break
		}
		if code := branchkey.ErrorCode(err); code != branchkey.EUNAVAILABLE {
			t.Fatalf("got %v, want EUNAVAILABLE or success", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no publish succeeded after the connection closed: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The first message, then this one (or this one twice).
	for _, id := range []string{"", m.ID} {
		if err := getOneAny(amqpURL, l, id); err != nil {
			t.Fatal(err)
		}
	}
}

// getOneAny is getOne that accepts any message when wantID is "".
func getOneAny(amqpURL string, l leaf, wantID string) error {
	if wantID != "" {
		return getOne(amqpURL, l, wantID)
	}
	conn, err := amqp.DialConfig(amqpURL, amqp.Config{
		Vhost: l.tree,
		SASL:  []amqp.Authentication{&amqp.PlainAuth{Username: l.id, Password: l.token}},
	})
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	d, ok, err := ch.Get(l.id, false)
	if err != nil {
		return err
	}
	if !ok {
		return errors.New("empty queue")
	}
	return d.Ack(false)
}

func TestNotifier_Close(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	amqpURL, _ := testURLs(t)
	n, err := rabbitmq.NewNotifier(amqpURL, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	mustPublish(t, n, newMessage(l, branchkey.MessageRunStatus, `{}`))
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	err = n.Publish(context.Background(), newMessage(l, branchkey.MessageRunStatus, `{}`))
	if code := branchkey.ErrorCode(err); code != branchkey.EUNAVAILABLE {
		t.Fatalf("publish after close: %v, want EUNAVAILABLE", err)
	}
}

func TestNotifier_Publish_Cancelled(t *testing.T) {
	b := MustBroker(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := n.Publish(ctx, newMessage(l, branchkey.MessageRunStatus, `{}`))
	if code := branchkey.ErrorCode(err); code != branchkey.EUNAVAILABLE || !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want EUNAVAILABLE wrapping context.Canceled", err)
	}
	// Nothing was left half done.
	mustPublish(t, n, newMessage(l, branchkey.MessageRunStatus, `{}`))
}
