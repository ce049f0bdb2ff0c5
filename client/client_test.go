package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/rabbitmq"
	"github.com/branchkey/branchkey/weights"
)

// TestClient_Flow runs the published client's whole flow with three leaves
// of one branch, over Server-Sent Events and over AMQP: log in, upload one
// update each, all three receive the aggregation, download the aggregate
// (numpy's FedAvg of the updates), see the run pause, log out.
func TestClient_Flow(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		amqp bool
	}{{"SSE", false}, {"AMQP", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ts := MustServer(t, tc.amqp)
			creds := MustBranch(t, ts, 3, 3)
			ctx := ctxT(t)
			var leaves []*client.Client
			for _, cr := range creds {
				c := MustClient(t, ts, cr)
				if err := c.Login(ctx); err != nil {
					t.Fatal(err)
				}
				if got := c.RunStatus(); got != branchkey.RunStarted {
					t.Errorf("RunStatus after login = %q, want start", got)
				}
				leaves = append(leaves, c)
			}

			var wg sync.WaitGroup
			ids := make([]string, len(leaves))
			errs := make([]error, len(leaves))
			for i, c := range leaves {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ids[i], errs[i] = c.FileUpload(ctx, filepath.Join(fixtures, "round_0", fmt.Sprintf("leaf%d.npy", i)), client.WithMetadata("epoch 1"))
				}()
			}
			wg.Wait()
			for i := range leaves {
				if errs[i] != nil || ids[i] == "" {
					t.Fatalf("leaf %d: FileUpload = %q, %v", i, ids[i], errs[i])
				}
			}

			want, err := weights.ReadFile(filepath.Join(fixtures, "round_0", "fedavg.npy"))
			if err != nil {
				t.Fatal(err)
			}
			var aggID string
			var first []byte
			for i, c := range leaves {
				n := next(t, c, branchkey.MessageAggregationStatus, 30*time.Second)
				if aggID == "" {
					aggID = n.AggregationID
				}
				if n.AggregationID == "" || n.AggregationID != aggID || n.Round != 1 || n.Run != 1 || n.NumSamples != want.NumSamples || n.ID == "" {
					t.Fatalf("leaf %d got %+v", i, n)
				}
				path, err := c.FileDownload(ctx, n.AggregationID)
				if err != nil {
					t.Fatal(err)
				}
				if path != filepath.Join(c.DownloadDir(), aggID) {
					t.Errorf("downloaded to %s", path)
				}
				b, err := os.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				if first == nil {
					first = b
				} else if !bytes.Equal(b, first) {
					t.Errorf("leaf %d downloaded other bytes than leaf 0", i)
				}
				got, err := weights.ReadFile(path)
				if err != nil {
					t.Fatal(err)
				}
				assertClose(t, got, want)
			}

			if _, err := ts.Admin.SetRun(ctx, creds[0].TreeID, creds[0].BranchID, branchkey.RunPaused); err != nil {
				t.Fatal(err)
			}
			for i, c := range leaves {
				n := next(t, c, branchkey.MessageRunStatus, 30*time.Second)
				if n.RunStatus != branchkey.RunPaused {
					t.Errorf("leaf %d got %+v", i, n)
				}
				if got := c.RunStatus(); got != branchkey.RunPaused {
					t.Errorf("leaf %d: RunStatus = %q after the pause", i, got)
				}
			}
			_, err = leaves[0].FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy"))
			mustCode(t, err, branchkey.ECONFLICT)

			for i, c := range leaves {
				if err := c.Logout(ctx); err != nil {
					t.Fatalf("leaf %d: %v", i, err)
				}
				if _, ok := <-c.Updates(); ok {
					t.Errorf("leaf %d: Updates still open after Logout", i)
				}
				if c.Err() != nil {
					t.Errorf("leaf %d: Err = %v after Logout", i, c.Err())
				}
				if c.Session() != nil {
					t.Errorf("leaf %d: Session kept after Logout", i)
				}
			}
		})
	}
}

// assertClose checks got against numpy's result: same num_samples, dtypes
// and shapes, and values within float32 rounding.
func assertClose(tb testing.TB, got, want *weights.Update) {
	tb.Helper()
	if got.NumSamples != want.NumSamples || got.Signature() != want.Signature() {
		tb.Fatalf("got num_samples %d, %s; want %d, %s", got.NumSamples, got.Signature(), want.NumSamples, want.Signature())
	}
	for i := range got.Tensors {
		g, w := &got.Tensors[i], &want.Tensors[i]
		gv, wv := make([]float64, g.Len()), make([]float64, w.Len())
		g.DType.ToFloat64(gv, g.Data)
		w.DType.ToFloat64(wv, w.Data)
		for j := range gv {
			if d := math.Abs(gv[j] - wv[j]); d > 1e-6*math.Max(1, math.Abs(wv[j])) {
				tb.Fatalf("tensor %d element %d: got %v, numpy %v", i, j, gv[j], wv[j])
			}
		}
	}
}

// TestClient_Relogin logs a leaf out behind its client's back (as another
// process would, or an expiring token): the consumer is refused, logs in
// again by itself and still delivers the next aggregation; a file call
// with the revoked token does too.
func TestClient_Relogin(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		amqp bool
	}{{"SSE", false}, {"AMQP", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ts := MustServer(t, tc.amqp)
			creds := MustBranch(t, ts, 1, 1)
			ctx := ctxT(t)
			c := MustClient(t, ts, creds[0])
			if err := c.Login(ctx); err != nil {
				t.Fatal(err)
			}
			old := c.Session()
			other := MustClient(t, ts, creds[0], client.WithoutConsumer())
			if err := other.Logout(ctx); err != nil {
				t.Fatal(err)
			}
			// Let the consumer notice: the broker closes the leaf's
			// connections at once, the event stream ends at its next
			// heartbeat (1s here).
			time.Sleep(1500 * time.Millisecond)
			if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
				t.Fatal(err)
			}
			if s := c.Session(); s == nil || s.AccessToken == old.AccessToken {
				t.Errorf("the session was not renewed")
			}
			n := next(t, c, branchkey.MessageAggregationStatus, 30*time.Second)
			if _, err := c.FileDownload(ctx, n.AggregationID); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestClient_WithSession reuses a saved session without logging in, and
// replaces a stale one transparently.
func TestClient_WithSession(t *testing.T) {
	t.Parallel()
	ts := MustServer(t, false)
	creds := MustBranch(t, ts, 1, 1)
	ctx := ctxT(t)
	first := MustClient(t, ts, creds[0], client.WithoutConsumer())
	if err := first.Login(ctx); err != nil {
		t.Fatal(err)
	}
	saved := *first.Session()

	t.Run("OK", func(t *testing.T) {
		c := MustClient(t, ts, creds[0], client.WithSession(saved), client.WithoutConsumer())
		if err := c.Login(ctx); err != nil {
			t.Fatal(err)
		}
		if got := c.Session(); got.AccessToken != saved.AccessToken {
			t.Errorf("Login replaced a valid saved session")
		}
	})
	t.Run("Stale", func(t *testing.T) {
		stale := saved
		stale.AccessToken = "0000"
		c := MustClient(t, ts, creds[0], client.WithSession(stale), client.WithoutConsumer())
		if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf1.npy")); err != nil {
			t.Fatal(err)
		}
		if got := c.Session(); got.AccessToken == stale.AccessToken || got.LeafID != saved.LeafID {
			t.Errorf("session after a refused token: %+v", got)
		}
	})
}

// TestClient_LastEventID resumes the event stream after a delivered event:
// a second client given its id does not see it again.
func TestClient_LastEventID(t *testing.T) {
	t.Parallel()
	ts := MustServer(t, false)
	creds := MustBranch(t, ts, 1, 1)
	ctx := ctxT(t)
	a := MustClient(t, ts, creds[0])
	if err := a.Login(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
		t.Fatal(err)
	}
	n1 := next(t, a, branchkey.MessageAggregationStatus, 30*time.Second)
	if a.LastEventID() != n1.ID {
		t.Errorf("LastEventID = %q, want %q", a.LastEventID(), n1.ID)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}

	b := MustClient(t, ts, creds[0], client.WithLastEventID(n1.ID))
	if err := b.Login(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := b.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf1.npy")); err != nil {
		t.Fatal(err)
	}
	n2 := next(t, b, branchkey.MessageAggregationStatus, 30*time.Second)
	if n2.ID == n1.ID || n2.AggregationID == n1.AggregationID || n2.Round != 2 {
		t.Errorf("after %+v got %+v", n1, n2)
	}
}

// TestClient_Errors checks the typed errors: the server's code and message
// come back, matched with errors.As, and permanent failures are not
// retried.
func TestClient_Errors(t *testing.T) {
	t.Parallel()
	ts := MustServer(t, false)
	creds := MustBranch(t, ts, 2, 1)
	ctx := ctxT(t)

	t.Run("ErrWrongPassword", func(t *testing.T) {
		cr := creds[0]
		cr.LeafPassword = "wrong"
		c := MustClient(t, ts, cr)
		err := c.Login(ctx)
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 401 || e.Code != branchkey.EUNAUTHORIZED || e.Message == "" || e.Temporary() {
			t.Fatalf("Login = %v (%#v)", err, e)
		}
	})
	t.Run("ErrWrongBranch", func(t *testing.T) {
		cr := creds[0]
		cr.BranchID = "another"
		err := MustClient(t, ts, cr).Login(ctx)
		mustCode(t, err, branchkey.EFORBIDDEN)
	})
	c := MustClient(t, ts, creds[0])
	t.Run("ErrNotFound", func(t *testing.T) {
		_, err := c.FileDownload(ctx, "00000000-0000-0000-0000-000000000000")
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 404 || e.Code != branchkey.ENOTFOUND {
			t.Fatalf("FileDownload = %v", err)
		}
		if entries, _ := os.ReadDir(c.DownloadDir()); len(entries) != 0 {
			t.Errorf("a failed download left %v", entries)
		}
	})
	t.Run("ErrBadID", func(t *testing.T) {
		_, err := c.FileDownload(ctx, "../etc/passwd")
		mustCode(t, err, branchkey.EINVALID)
	})
	t.Run("ErrInvalidFile", func(t *testing.T) {
		_, err := c.FileUpload(ctx, filepath.Join(fixtures, "bad_exec_os_system.npy"))
		mustCode(t, err, branchkey.EINVALID)
	})
	t.Run("ErrMismatch", func(t *testing.T) {
		if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
			t.Fatal(err)
		}
		_, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0_mismatch.npy"))
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 400 || e.Code != branchkey.EINVALID {
			t.Fatalf("FileUpload = %v", err)
		}
	})
	t.Run("ErrMissingFile", func(t *testing.T) {
		_, err := c.FileUpload(ctx, filepath.Join(t.TempDir(), "none.npy"))
		if !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("FileUpload = %v", err)
		}
	})
	t.Run("ErrCancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy"))
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("FileUpload = %v", err)
		}
	})
}

// TestClient_AMQPDedupe publishes a message twice with the same
// message_id, as an at-least-once relay may: the leaf gets it once.
func TestClient_AMQPDedupe(t *testing.T) {
	t.Parallel()
	amqpURL, _ := testBroker(t)
	ts := MustServer(t, true)
	creds := MustBranch(t, ts, 3, 1)
	ctx := ctxT(t)
	c := MustClient(t, ts, creds[0])
	if err := c.Login(ctx); err != nil {
		t.Fatal(err)
	}
	n, err := rabbitmq.NewNotifier(amqpURL, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	msg := func(id string, status branchkey.RunStatus) *branchkey.Message {
		return &branchkey.Message{ID: id, TreeID: creds[0].TreeID, BranchID: creds[0].BranchID, Type: branchkey.MessageRunStatus,
			Body: []byte(`{"run_status": "` + string(status) + `", "run_number": 1, "round": 1}`)}
	}
	for _, m := range []*branchkey.Message{msg("dup-1", branchkey.RunPaused), msg("dup-1", branchkey.RunPaused), msg("dup-2", branchkey.RunStarted)} {
		if err := n.Publish(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	first := next(t, c, branchkey.MessageRunStatus, 30*time.Second)
	second := next(t, c, branchkey.MessageRunStatus, 30*time.Second)
	if first.ID != "dup-1" || first.RunStatus != branchkey.RunPaused || second.ID != "dup-2" || second.RunStatus != branchkey.RunStarted {
		t.Fatalf("got %+v then %+v", first, second)
	}
}

// TestClient_LoginAgain logs in, out, and in again with one client: the
// second login's Updates is a new channel that delivers.
func TestClient_LoginAgain(t *testing.T) {
	t.Parallel()
	ts := MustServer(t, false)
	creds := MustBranch(t, ts, 1, 1)
	ctx := ctxT(t)
	c := MustClient(t, ts, creds[0])
	if err := c.Login(ctx); err != nil {
		t.Fatal(err)
	}
	first := c.Updates()
	if err := c.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-first; ok {
		t.Fatal("Updates open after Logout")
	}
	if err := c.Login(ctx); err != nil {
		t.Fatal(err)
	}
	if c.Updates() == first {
		t.Fatal("the second login reuses the closed channel")
	}
	if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
		t.Fatal(err)
	}
	next(t, c, branchkey.MessageAggregationStatus, 30*time.Second)
}
