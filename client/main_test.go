package client_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/file"
	"github.com/branchkey/branchkey/httpapi"
	"github.com/branchkey/branchkey/rabbitmq"
	"github.com/branchkey/branchkey/service"
	"github.com/branchkey/branchkey/sqlite"
	amqp "github.com/rabbitmq/amqp091-go"
)

// fixtures holds numpy-made weights files: round_0/leaf{0,1,2}.npy and
// their FedAvg, fedavg.npy.
var fixtures = filepath.Join("..", "testdata", "fixtures")

const adminToken = "client-test-admin-token"

// uniqueName returns a name no other test, here or in another package
// sharing the broker, uses.
func uniqueName(kind string) string {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return "bkclient-" + kind + "-" + hex.EncodeToString(b[:])
}

func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tb.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// Server is an in-process branchkey server: the same service and HTTP
// layer "branchkey serve" runs, on SQLite and files in a temp dir, behind
// an httptest.Server.
type Server struct {
	*httptest.Server
	Admin   *client.Admin
	Service *service.Service
	// Log counts the server's log records by message.
	Log *countingHandler
	// AMQPHost and AMQPPort name the broker leaves consume from; empty
	// without one.
	AMQPHost string
	AMQPPort int
}

// MustServer starts an in-process server; with amqp it provisions leaves on
// the test broker and notifies through it (the test is skipped when
// BRANCHKEY_TEST_AMQP_URL and BRANCHKEY_TEST_RABBITMQ_ADMIN_URL are unset).
// Middlewares wrap the server's handler, first outermost.
func MustServer(tb testing.TB, withAMQP bool, middlewares ...func(http.Handler) http.Handler) *Server {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	dir := tb.TempDir()
	counts := &countingHandler{Handler: testLogger(tb).Handler(), counts: &counts{m: map[string]int{}}}
	log := slog.New(counts)
	store, err := sqlite.Open(ctx, filepath.Join(dir, "branchkey.db"))
	if err != nil {
		tb.Fatal(err)
	}
	blobs, err := file.New(filepath.Join(dir, "blobs"))
	if err != nil {
		tb.Fatal(err)
	}
	ts := &Server{Log: counts}
	var opts []service.Option
	var notifier *rabbitmq.Notifier
	if withAMQP {
		amqpURL, adminURL := testBroker(tb)
		uri, err := amqp.ParseURI(amqpURL)
		if err != nil {
			tb.Fatal(err)
		}
		broker, err := rabbitmq.NewBroker(adminURL, uri.Username, rabbitmq.WithLogger(log))
		if err != nil {
			tb.Fatal(err)
		}
		notifier, err = rabbitmq.NewNotifier(amqpURL, log)
		if err != nil {
			tb.Fatal(err)
		}
		opts = append(opts, service.WithBroker(broker), service.WithNotifier(notifier))
		ts.AMQPHost, ts.AMQPPort = uri.Host, uri.Port
	}
	svc := service.New(store, blobs, service.Config{PollInterval: 100 * time.Millisecond}, log, opts...)
	api := httpapi.New(svc, adminToken, log)
	api.Heartbeat = time.Second
	var h http.Handler = api
	for i := len(middlewares) - 1; i >= 0; i-- {
		h = middlewares[i](h)
	}
	ts.Server = httptest.NewServer(h)
	ts.Service = svc
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = svc.Run(ctx)
	}()
	tb.Cleanup(func() {
		ts.CloseClientConnections()
		ts.Close()
		cancel()
		wg.Wait()
		if notifier != nil {
			_ = notifier.Close()
		}
		_ = store.Close()
	})
	ts.Admin, err = client.NewAdmin(ts.URL, adminToken, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return ts
}

// countingHandler counts every log record by message and passes warnings
// and errors on to Handler.
type countingHandler struct {
	slog.Handler
	counts *counts
}

type counts struct {
	mu sync.Mutex
	m  map[string]int
}

// Count returns how many records with message msg were logged.
func (h *countingHandler) Count(msg string) int {
	h.counts.mu.Lock()
	defer h.counts.mu.Unlock()
	return h.counts.m[msg]
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *countingHandler) Handle(ctx context.Context, r slog.Record) error {
	h.counts.mu.Lock()
	h.counts.m[r.Message]++
	h.counts.mu.Unlock()
	if r.Level >= slog.LevelWarn {
		return h.Handler.Handle(ctx, r)
	}
	return nil
}

func (h *countingHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &countingHandler{Handler: h.Handler.WithAttrs(as), counts: h.counts}
}

func (h *countingHandler) WithGroup(name string) slog.Handler {
	return &countingHandler{Handler: h.Handler.WithGroup(name), counts: h.counts}
}

// testBroker returns the test broker's URLs, skipping the test without.
func testBroker(tb testing.TB) (amqpURL, adminURL string) {
	tb.Helper()
	amqpURL = os.Getenv("BRANCHKEY_TEST_AMQP_URL")
	adminURL = os.Getenv("BRANCHKEY_TEST_RABBITMQ_ADMIN_URL")
	if amqpURL == "" || adminURL == "" {
		tb.Skip("BRANCHKEY_TEST_AMQP_URL and BRANCHKEY_TEST_RABBITMQ_ADMIN_URL name no broker")
	}
	return amqpURL, adminURL
}

// MustBranch creates a new tree and branch aggregating once minUpdates
// leaves uploaded, and n leaves of it, and returns their credentials. The
// tree (and its broker side) is deleted at cleanup.
func MustBranch(tb testing.TB, ts *Server, minUpdates, n int) []client.Credentials {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	tree, branch := uniqueName("tree"), uniqueName("branch")
	if _, err := ts.Admin.CreateTree(ctx, tree); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := ts.Admin.DeleteTree(ctx, tree); err != nil {
			tb.Errorf("delete tree %s: %v", tree, err)
		}
	})
	if _, err := ts.Admin.CreateBranch(ctx, tree, client.BranchSpec{ID: branch, MinUpdates: &minUpdates}); err != nil {
		tb.Fatal(err)
	}
	var creds []client.Credentials
	for i := range n {
		name := uniqueName("leaf" + strconv.Itoa(i))
		l, err := ts.Admin.CreateLeaf(ctx, tree, branch, name, "")
		if err != nil {
			tb.Fatal(err)
		}
		creds = append(creds, client.Credentials{LeafName: name, LeafPassword: l.Password, TreeID: tree, BranchID: branch,
			Host: ts.AMQPHost, Port: ts.AMQPPort})
	}
	return creds
}

// MustClient returns a client of ts for creds, with quick retries and a
// download directory of its own, closed at cleanup.
func MustClient(tb testing.TB, ts *Server, creds client.Credentials, opts ...client.Option) *client.Client {
	tb.Helper()
	opts = append([]client.Option{
		client.WithServer(ts.URL),
		client.WithDownloadDir(tb.TempDir()),
		client.WithLogger(testLogger(tb)),
		client.WithRetry(client.RetryPolicy{Attempts: 5, MinBackoff: 20 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}),
	}, opts...)
	c, err := client.New(creds, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// next returns the next notification of type typ from c, skipping others,
// or fails after timeout.
func next(tb testing.TB, c *client.Client, typ string, timeout time.Duration) client.Notification {
	tb.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case n, ok := <-c.Updates():
			if !ok {
				tb.Fatalf("Updates closed: %v", c.Err())
			}
			if n.Type == typ {
				return n
			}
		case <-deadline:
			tb.Fatalf("no %s notification within %v", typ, timeout)
		}
	}
}

// ctxT returns a context that ends with the test or after a minute.
func ctxT(tb testing.TB) context.Context {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	tb.Cleanup(cancel)
	return ctx
}

// mustCode fails unless err carries the domain code.
func mustCode(tb testing.TB, err error, code string) {
	tb.Helper()
	if got := branchkey.ErrorCode(err); err == nil || got != code {
		tb.Fatalf("error %v has code %q, want %q", err, got, code)
	}
}
