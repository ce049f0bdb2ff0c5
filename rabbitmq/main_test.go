package rabbitmq_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/rabbitmq"
	amqp "github.com/rabbitmq/amqp091-go"
)

// testURLs returns the broker's AMQP and management URLs, and skips the
// test when they are not set.
func testURLs(tb testing.TB) (amqpURL, adminURL string) {
	tb.Helper()
	amqpURL = os.Getenv("BRANCHKEY_TEST_AMQP_URL")
	adminURL = os.Getenv("BRANCHKEY_TEST_RABBITMQ_ADMIN_URL")
	if amqpURL == "" || adminURL == "" {
		tb.Skip("BRANCHKEY_TEST_AMQP_URL and BRANCHKEY_TEST_RABBITMQ_ADMIN_URL name no broker")
	}
	return amqpURL, adminURL
}

// uniqueName returns a name no other test, here or in another package
// sharing the broker, uses.
func uniqueName(kind string) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return "bktest-" + kind + "-" + hex.EncodeToString(b[:])
}

func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// MustBroker returns a Broker for the test broker.
func MustBroker(tb testing.TB) *rabbitmq.Broker {
	tb.Helper()
	amqpURL, adminURL := testURLs(tb)
	uri, err := amqp.ParseURI(amqpURL)
	if err != nil {
		tb.Fatal(err)
	}
	b, err := rabbitmq.NewBroker(adminURL, uri.Username, rabbitmq.WithLogger(testLogger(tb)))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// MustNotifier returns a Notifier for the test broker, closed at cleanup.
func MustNotifier(tb testing.TB, opts ...rabbitmq.NotifierOption) *rabbitmq.Notifier {
	tb.Helper()
	amqpURL, _ := testURLs(tb)
	n, err := rabbitmq.NewNotifier(amqpURL, testLogger(tb), opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := n.Close(); err != nil {
			tb.Errorf("close notifier: %v", err)
		}
	})
	return n
}

// MustTree returns a new tree id whose vhost and the given leaves' users are
// deleted at cleanup.
func MustTree(tb testing.TB, b *rabbitmq.Broker, leaves *[]string) string {
	tb.Helper()
	tree := uniqueName("tree")
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		var ids []string
		if leaves != nil {
			ids = *leaves
		}
		if err := b.DeleteTree(ctx, tree, ids); err != nil {
			tb.Errorf("delete tree %s: %v", tree, err)
		}
	})
	return tree
}

// leaf is a provisioned leaf and its AMQP password.
type leaf struct {
	tree, branch, id, token string
}

// MustLeaf provisions a new leaf of branch, deleted at cleanup.
func MustLeaf(tb testing.TB, b *rabbitmq.Broker, tree, branch string) leaf {
	tb.Helper()
	l := leaf{tree: tree, branch: branch, id: uniqueName("leaf"), token: uniqueName("token")}
	mustProvision(tb, b, l)
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := b.DeleteLeaf(ctx, l.tree, l.branch, l.id); err != nil {
			tb.Errorf("delete leaf %s: %v", l.id, err)
		}
	})
	return l
}

func mustProvision(tb testing.TB, b *rabbitmq.Broker, l leaf) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := b.PrepareLeaf(ctx, l.tree, l.branch, l.id); err != nil {
		tb.Fatal(err)
	}
	if err := b.GrantLeaf(ctx, l.tree, l.id, l.token); err != nil {
		tb.Fatal(err)
	}
}

// dialLeaf connects as the published client does: vhost = tree, user =
// leaf id, password = token.
func dialLeaf(tb testing.TB, l leaf) (*amqp.Connection, error) {
	tb.Helper()
	amqpURL, _ := testURLs(tb)
	conn, err := amqp.DialConfig(amqpURL, amqp.Config{
		Vhost:     l.tree,
		SASL:      []amqp.Authentication{&amqp.PlainAuth{Username: l.id, Password: l.token}},
		Heartbeat: 30 * time.Second,
	})
	if err == nil {
		tb.Cleanup(func() { _ = conn.Close() })
	}
	return conn, err
}

func mustDialLeaf(tb testing.TB, l leaf) *amqp.Connection {
	tb.Helper()
	conn, err := dialLeaf(tb, l)
	if err != nil {
		tb.Fatalf("leaf %s connects to vhost %s: %v", l.id, l.tree, err)
	}
	return conn
}

func mustChannel(tb testing.TB, conn *amqp.Connection) *amqp.Channel {
	tb.Helper()
	ch, err := conn.Channel()
	if err != nil {
		tb.Fatal(err)
	}
	return ch
}

// newMessage returns a message for the leaf's branch with a unique id.
func newMessage(l leaf, typ string, body string) *branchkey.Message {
	return &branchkey.Message{
		ID:        uniqueName("msg"),
		TreeID:    l.tree,
		BranchID:  l.branch,
		Type:      typ,
		Body:      json.RawMessage(body),
		CreatedAt: time.Now().Truncate(time.Second),
	}
}

func mustPublish(tb testing.TB, n *rabbitmq.Notifier, m *branchkey.Message) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Publish(ctx, m); err != nil {
		tb.Fatalf("publish %s: %v", m.ID, err)
	}
}

// admin reads the management API, to check what the Broker did.
type admin struct {
	base       string
	user, pass string
}

func newAdmin(tb testing.TB) *admin {
	tb.Helper()
	_, adminURL := testURLs(tb)
	u, err := url.Parse(adminURL)
	if err != nil {
		tb.Fatal(err)
	}
	pw, _ := u.User.Password()
	a := &admin{user: u.User.Username(), pass: pw}
	u.User = nil
	a.base = strings.TrimSuffix(u.String(), "/")
	return a
}

// do sends a request to /api/ followed by the escaped segments and returns
// the status; a 200 answer is decoded into out.
func (a *admin) do(tb testing.TB, method string, out any, segs ...string) int {
	tb.Helper()
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	req, err := http.NewRequest(method, a.base+"/api/"+strings.Join(segs, "/"), nil)
	if err != nil {
		tb.Fatal(err)
	}
	req.SetBasicAuth(a.user, a.pass)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	if resp.StatusCode == http.StatusOK && out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			tb.Fatalf("%s %v: %v", method, segs, err)
		}
	}
	return resp.StatusCode
}

// exists reports whether GET /api/segs... answers 200 (or 404).
func (a *admin) exists(tb testing.TB, segs ...string) bool {
	tb.Helper()
	switch st := a.do(tb, http.MethodGet, nil, segs...); st {
	case http.StatusOK:
		return true
	case http.StatusNotFound:
		return false
	default:
		tb.Fatalf("GET %v: status %d", segs, st)
		return false
	}
}

// eventually calls f every 100ms until it returns true or timeout passes.
func eventually(timeout time.Duration, f func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if f() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// amqpCode returns the AMQP reply code in err's chain, 0 if none.
func amqpCode(err error) int {
	var e *amqp.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}
