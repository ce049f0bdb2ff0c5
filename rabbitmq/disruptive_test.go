package rabbitmq_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/rabbitmq"
)

// disruptive skips t unless BRANCHKEY_TEST_DISRUPTIVE=1: the test stops the
// shared broker, which would fail other packages' tests running meanwhile,
// so CI runs these alone in a serial pass.
func disruptive(t *testing.T) {
	t.Helper()
	if os.Getenv("BRANCHKEY_TEST_DISRUPTIVE") != "1" {
		t.Skip("stops the shared broker; set BRANCHKEY_TEST_DISRUPTIVE=1 to run")
	}
}

// rabbitmqctl runs rabbitmqctl with args.
func rabbitmqctl(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "rabbitmqctl", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("rabbitmqctl %v: %w\n%s", args, err, out)
	}
	return nil
}

// mustStartBroker starts the broker's application and waits until the
// management API answers again. It is safe when the broker is running.
func mustStartBroker(tb testing.TB, a *admin) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := rabbitmqctl(ctx, "start_app"); err != nil {
		tb.Fatal(err)
	}
	if err := rabbitmqctl(ctx, "await_startup"); err != nil {
		tb.Fatal(err)
	}
	ok := eventually(2*time.Minute, func() bool {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, a.base+"/api/overview", nil)
		req.SetBasicAuth(a.user, a.pass)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	if !ok {
		tb.Fatal("the management API did not come back after start_app")
	}
}

// TestDisruptiveBrokerRestart stops the broker's application while messages
// are being published and starts it again: Publish fails with EUNAVAILABLE
// while it is down, succeeds after, and every message is confirmed once from
// the caller's view and reaches the leaf's queue.
func TestDisruptiveBrokerRestart(t *testing.T) {
	disruptive(t)
	if _, err := exec.LookPath("rabbitmqctl"); err != nil {
		t.Fatal(err)
	}
	b := MustBroker(t)
	a := newAdmin(t)
	tree := MustTree(t, b, nil)
	l := MustLeaf(t, b, tree, uniqueName("branch"))
	n := MustNotifier(t, rabbitmq.WithReconnectBackoff(50*time.Millisecond, time.Second))
	// Registered last, so it runs first: the deletes above need the broker.
	t.Cleanup(func() { mustStartBroker(t, a) })

	const (
		up = iota
		down
		restarting
	)
	var (
		phase       atomic.Int32
		confirmed   atomic.Int32
		mu          sync.Mutex
		ids         []string
		downErrs    int           // EUNAVAILABLE while the broker is down
		downOK      int           // successes while the broker is down: must be 0
		slowest     time.Duration // longest failed Publish
		unavailable int
		otherErrs   []error
	)
	done, stop := make(chan struct{}), make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// The publisher sends one message after another, each retried until it
	// is confirmed, as an outbox relay would, until stop is closed.
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			m := newMessage(l, branchkey.MessageRunStatus, fmt.Sprintf(`{"run_status":"start","n":%d}`, i))
			for {
				if ctx.Err() != nil {
					return
				}
				before := phase.Load()
				start := time.Now()
				pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
				err := n.Publish(pctx, m)
				pcancel()
				took := time.Since(start)
				after := phase.Load()
				mu.Lock()
				switch {
				case err == nil:
					ids = append(ids, m.ID)
					if before == down && after == down {
						downOK++
					}
				case branchkey.ErrorCode(err) == branchkey.EUNAVAILABLE:
					unavailable++
					if before == down && after == down {
						downErrs++
					}
					slowest = max(slowest, took)
				default:
					otherErrs = append(otherErrs, err)
				}
				mu.Unlock()
				if err == nil {
					confirmed.Add(1)
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}()

	if !eventually(time.Minute, func() bool { return confirmed.Load() >= 100 }) {
		t.Fatalf("only %d messages confirmed before the restart", confirmed.Load())
	}
	if err := rabbitmqctl(ctx, "stop_app"); err != nil {
		t.Fatal(err)
	}
	phase.Store(down)
	t.Logf("broker stopped after %d confirmed messages", confirmed.Load())
	eventually(10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return downErrs >= 5
	})
	phase.Store(restarting)
	mustStartBroker(t, a)
	phase.Store(up)
	before := confirmed.Load()
	t.Logf("broker started again; %d messages confirmed so far", before)
	if !eventually(time.Minute, func() bool { return confirmed.Load() >= before+100 }) {
		t.Errorf("only %d messages confirmed after the restart", confirmed.Load()-before)
	}
	close(stop)
	select {
	case <-done:
	case <-ctx.Done():
		t.Error("the publisher did not finish")
	}
	cancel()
	<-done

	mu.Lock()
	defer mu.Unlock()
	t.Logf("EUNAVAILABLE %d times (%d while down), slowest failed Publish %s", unavailable, downErrs, slowest.Round(time.Millisecond))
	for _, err := range otherErrs {
		t.Errorf("Publish failed with something other than EUNAVAILABLE: %v", err)
	}
	if downErrs == 0 {
		t.Error("no Publish failed while the broker was down")
	}
	if downOK != 0 {
		t.Errorf("%d Publish calls succeeded while the broker was down", downOK)
	}
	nMsgs := len(ids)

	// Every confirmed message is in the queue; one whose confirm was lost
	// with the connection may be there twice.
	want := make(map[string]bool, nMsgs)
	for _, id := range ids {
		want[id] = true
	}
	conn := mustDialLeaf(t, l)
	deliveries, err := mustChannel(t, conn).Consume(l.id, "", true, false, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	dups := 0
	for len(want) > 0 {
		select {
		case d := <-deliveries:
			if !want[d.MessageId] {
				dups++
			}
			delete(want, d.MessageId)
		case <-time.After(15 * time.Second):
			t.Fatalf("%d confirmed messages are not in the queue", len(want))
		}
	}
	t.Logf("all %d messages delivered, %d duplicates", nMsgs, dups)
}
