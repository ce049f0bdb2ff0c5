package postgres_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/postgres"
)

// replicas opens two Stores on one schema, each with a pool of its own, as
// two server processes would.
func replicas(t *testing.T) [2]*postgres.Store {
	t.Helper()
	schema := MustSchema(t)
	return [2]*postgres.Store{MustOpenIn(t, schema), MustOpenIn(t, schema)}
}

var t0 = time.Date(2031, 5, 6, 7, 8, 9, 123456000, time.UTC)

// race runs fn n times at once and returns the errors by index.
func race(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			errs[i] = fn(i)
		})
	}
	close(start)
	wg.Wait()
	return errs
}

// mustBranch creates a started branch with leaves that each uploaded once
// to round 1, through s.
func mustBranch(t *testing.T, s branchkey.Store, id string, leaves int) *branchkey.Branch {
	t.Helper()
	ctx := context.Background()
	if err := s.CreateTree(ctx, &branchkey.Tree{ID: "t-" + id}); err != nil {
		t.Fatal(err)
	}
	b := &branchkey.Branch{TreeID: "t-" + id, ID: id, RunStatus: branchkey.RunStarted, Policy: branchkey.Policy{MinUpdates: 1000, Strategy: "fedavg"}}
	if err := s.CreateBranch(ctx, b); err != nil {
		t.Fatal(err)
	}
	for i := range leaves {
		l := &branchkey.Leaf{ID: fmt.Sprintf("%s-l%d", id, i), TreeID: b.TreeID, BranchID: b.ID, Name: fmt.Sprintf("%s-n%d", id, i)}
		if err := s.CreateLeaf(ctx, l); err != nil {
			t.Fatal(err)
		}
		u := &branchkey.Update{ID: fmt.Sprintf("%s-u%d", id, i), TreeID: b.TreeID, BranchID: b.ID, LeafID: l.ID, Signature: "s", BlobKey: "k"}
		if _, err := s.PutUpdate(ctx, u, nil); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

// TestReplicasCloseAndClaimRound races two replicas on closing a round and
// then on claiming it: exactly one of each succeeds, the claim is taken over
// by the other replica only once it expired, and only the owner of record
// can finish.
func TestReplicasCloseAndClaimRound(t *testing.T) {
	ctx := context.Background()
	rs := replicas(t)
	b := mustBranch(t, rs[0], "b", 3)
	key := branchkey.RoundKey{TreeID: b.TreeID, BranchID: b.ID, Run: 1, Round: 1}

	for attempt := range 3 {
		// Each attempt closes the current round of a fresh run.
		if attempt > 0 {
			for _, st := range []branchkey.RunStatus{branchkey.RunStopped, branchkey.RunStarted} {
				if _, err := rs[1].SetRunStatus(ctx, b.TreeID, b.ID, st, nil); err != nil {
					t.Fatal(err)
				}
			}
			key.Run++
			for i := range 3 {
				u := &branchkey.Update{ID: fmt.Sprintf("r%d-u%d", key.Run, i), TreeID: b.TreeID, BranchID: b.ID, LeafID: fmt.Sprintf("b-l%d", i), Signature: "s"}
				if _, err := rs[i%2].PutUpdate(ctx, u, nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		const n = 12
		errs := race(n, func(i int) error {
			_, err := rs[i%2].CloseRound(ctx, key, "min_updates", func(ups []*branchkey.Update) ([]string, error) {
				ids := make([]string, len(ups))
				for j, u := range ups {
					ids[j] = u.ID
				}
				return ids, nil
			})
			return err
		})
		won := 0
		for i, err := range errs {
			switch branchkey.ErrorCode(err) {
			case "":
				won++
			case branchkey.ECONFLICT:
			default:
				t.Fatalf("closer %d: %v", i, err)
			}
		}
		if won != 1 {
			t.Fatalf("run %d: %d of %d CloseRound calls across two replicas succeeded, want 1", key.Run, won, n)
		}
		r, err := rs[1].FindRound(ctx, key)
		if err != nil || r.Status != branchkey.RoundClosed || len(r.Inputs) != 3 {
			t.Fatalf("closed round = %+v, %v", r, err)
		}
		if got, _ := rs[0].FindBranch(ctx, b.TreeID, b.ID); got.Round != 2 {
			t.Fatalf("branch at round %d after the close, want 2", got.Round)
		}

		owners := make([]string, n)
		errs = race(n, func(i int) error {
			owners[i] = fmt.Sprintf("replica-%d/worker-%d", i%2, i)
			_, err := rs[i%2].ClaimRound(ctx, key, owners[i], t0, t0.Add(time.Minute))
			return err
		})
		winner := -1
		for i, err := range errs {
			switch branchkey.ErrorCode(err) {
			case "":
				if winner >= 0 {
					t.Fatalf("%s and %s both claimed the round", owners[winner], owners[i])
				}
				winner = i
			case branchkey.ECONFLICT:
			default:
				t.Fatalf("claimer %d: %v", i, err)
			}
		}
		if winner < 0 {
			t.Fatal("no claim succeeded")
		}
		other := rs[(winner+1)%2]
		if _, err := other.ClaimRound(ctx, key, "late", t0.Add(59*time.Second), t0.Add(2*time.Minute)); branchkey.ErrorCode(err) != branchkey.ECONFLICT {
			t.Fatalf("claim before expiry = %v, want ECONFLICT", err)
		}

		// After expiry the replicas race to take it over; one does.
		errs = race(n, func(i int) error {
			_, err := rs[i%2].ClaimRound(ctx, key, fmt.Sprintf("taker-%d", i), t0.Add(61*time.Second), t0.Add(3*time.Minute))
			return err
		})
		taker := -1
		for i, err := range errs {
			if err == nil {
				if taker >= 0 {
					t.Fatalf("takers %d and %d both took over", taker, i)
				}
				taker = i
			} else if branchkey.ErrorCode(err) != branchkey.ECONFLICT {
				t.Fatalf("taker %d: %v", i, err)
			}
		}
		if taker < 0 {
			t.Fatal("nobody took over the expired claim")
		}
		a := &branchkey.Aggregation{ID: fmt.Sprintf("agg-%d", key.Run), TreeID: key.TreeID, BranchID: key.BranchID, Run: key.Run, Round: key.Round, Inputs: r.Inputs}
		if err := other.FinishRound(ctx, a, owners[winner], nil); branchkey.ErrorCode(err) != branchkey.ECONFLICT {
			t.Fatalf("finish by the owner whose claim was taken over = %v, want ECONFLICT", err)
		}
		// The new owner and the old one race to finish: the new one wins,
		// once.
		errs = race(2, func(i int) error {
			owner := []string{fmt.Sprintf("taker-%d", taker), owners[winner]}[i]
			return rs[i].FinishRound(ctx, a, owner, nil)
		})
		if errs[0] != nil || branchkey.ErrorCode(errs[1]) != branchkey.ECONFLICT {
			t.Fatalf("finish by new and old owner = %v, %v; want nil, ECONFLICT", errs[0], errs[1])
		}
	}
}

// TestReplicasClaimOutbox runs relays on two replicas at once, several per
// replica, until the outbox is empty: no message is leased to two owners
// while its lease holds, and every message is published once.
func TestReplicasClaimOutbox(t *testing.T) {
	ctx := context.Background()
	rs := replicas(t)
	b := mustBranch(t, rs[0], "b", 0)
	const total = 120
	for i := range total {
		status := []branchkey.RunStatus{branchkey.RunPaused, branchkey.RunStarted}[i%2]
		_, err := rs[i%2].SetRunStatus(ctx, b.TreeID, b.ID, status, func(nb *branchkey.Branch) *branchkey.Message {
			return &branchkey.Message{ID: fmt.Sprintf("m%03d", i), Type: branchkey.MessageRunStatus, Body: json.RawMessage(`{}`)}
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	var mu sync.Mutex
	leasedTo := map[string]string{}
	published := map[string]int{}
	const relaysPerReplica = 3
	errs := race(2*relaysPerReplica, func(i int) error {
		s := rs[i%2]
		owner := fmt.Sprintf("replica-%d", i)
		for {
			// A lease of an hour never expires during the test, so a
			// message handed to two owners would be a bug.
			ms, err := s.ClaimOutbox(ctx, owner, t0, t0.Add(time.Hour), 7)
			if err != nil {
				return err
			}
			if len(ms) == 0 {
				return nil
			}
			ids := make([]string, len(ms))
			mu.Lock()
			for j, m := range ms {
				if prev, ok := leasedTo[m.ID]; ok && prev != owner {
					mu.Unlock()
					return fmt.Errorf("message %s leased to both %s and %s", m.ID, prev, owner)
				}
				if j > 0 && m.Seq <= ms[j-1].Seq {
					mu.Unlock()
					return fmt.Errorf("claimed messages not by seq: %d after %d", m.Seq, ms[j-1].Seq)
				}
				leasedTo[m.ID] = owner
				published[m.ID]++
				ids[j] = m.ID
			}
			mu.Unlock()
			if err := s.MarkPublished(ctx, ids); err != nil {
				return err
			}
		}
	})
	for i, err := range errs {
		if err != nil {
			t.Fatalf("relay %d: %v", i, err)
		}
	}
	if len(published) != total {
		t.Fatalf("%d messages published, want %d", len(published), total)
	}
	for id, n := range published {
		if n != 1 {
			t.Fatalf("message %s published %d times", id, n)
		}
	}
	owners := map[string]bool{}
	for _, o := range leasedTo {
		owners[o] = true
	}
	t.Logf("%d relays shared the %d messages", len(owners), total)
}

// TestReplicasMessageSeqVisibleInOrder inserts messages from two replicas
// into many branches at once while a watcher polls as the SSE hub does: the
// highest seq, then each branch's messages. Every seq at or below a highest
// seq the watcher saw must already have been visible then; one that shows up
// later would be a message the hub skipped for good.
func TestReplicasMessageSeqVisibleInOrder(t *testing.T) {
	ctx := context.Background()
	schema := MustSchema(t)
	// Larger pools than the machine's default, so that many inserts are in
	// flight at once.
	wide := postgres.WithPoolConfig(func(c *pgxpool.Config) { c.MaxConns = 12 })
	rs := [2]*postgres.Store{MustOpenIn(t, schema, wide), MustOpenIn(t, schema, wide)}
	const branches, each = 12, 25
	var bs []*branchkey.Branch
	for i := range branches {
		bs = append(bs, mustBranch(t, rs[0], fmt.Sprintf("b%02d", i), 0))
	}

	type snapshot struct {
		last int64
		seen map[int64]bool
	}
	var snaps []snapshot
	done := make(chan struct{})
	watcherErr := make(chan error, 1)
	go func() {
		defer close(watcherErr)
		for {
			select {
			case <-done:
				return
			default:
			}
			last, err := rs[1].LastMessageSeq(ctx)
			if err != nil {
				watcherErr <- err
				return
			}
			seen := map[int64]bool{}
			for _, b := range bs {
				ms, err := rs[1].ListMessages(ctx, b.TreeID, b.ID, 0, 0)
				if err != nil {
					watcherErr <- err
					return
				}
				for _, m := range ms {
					seen[m.Seq] = true
				}
			}
			snaps = append(snaps, snapshot{last, seen})
		}
	}()

	errs := race(branches, func(i int) error {
		b := bs[i]
		for j := range each {
			status := []branchkey.RunStatus{branchkey.RunPaused, branchkey.RunStarted}[j%2]
			_, err := rs[(i+j)%2].SetRunStatus(ctx, b.TreeID, b.ID, status, func(*branchkey.Branch) *branchkey.Message {
				return &branchkey.Message{ID: fmt.Sprintf("%s-m%d", b.ID, j), Type: branchkey.MessageRunStatus, Body: json.RawMessage(`{}`)}
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	close(done)
	if err := <-watcherErr; err != nil {
		t.Fatal(err)
	}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("writer %d: %v", i, err)
		}
	}

	final := map[int64]bool{}
	for _, b := range bs {
		ms, err := rs[0].ListMessages(ctx, b.TreeID, b.ID, 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			final[m.Seq] = true
		}
	}
	if len(final) != branches*each {
		t.Fatalf("%d messages stored, want %d", len(final), branches*each)
	}
	for _, s := range snaps {
		for seq := range final {
			// The watcher read the highest seq before the lists, so
			// everything at or below it must have been in them.
			if seq <= s.last && !s.seen[seq] {
				t.Fatalf("seq %d became visible after the highest seq %d was read", seq, s.last)
			}
		}
	}
	t.Logf("%d watcher passes", len(snaps))
}

// TestReplicasDeleteExpiredTokens sweeps expired tokens from two replicas at
// once: each leaf left without a valid token is reported once in all.
func TestReplicasDeleteExpiredTokens(t *testing.T) {
	ctx := context.Background()
	rs := replicas(t)
	b := mustBranch(t, rs[0], "b", 0)
	var want []string
	for i := range 20 {
		l := &branchkey.Leaf{ID: fmt.Sprintf("l%02d", i), TreeID: b.TreeID, BranchID: b.ID, Name: fmt.Sprintf("n%02d", i)}
		if err := rs[0].CreateLeaf(ctx, l); err != nil {
			t.Fatal(err)
		}
		want = append(want, l.ID)
		for j := range 3 {
			tok := &branchkey.Token{Hash: fmt.Sprintf("h%02d-%d", i, j), LeafID: l.ID, ExpiresAt: t0.Add(-time.Duration(j+1) * time.Minute)}
			if err := rs[1].CreateToken(ctx, tok); err != nil {
				t.Fatal(err)
			}
		}
	}
	const callers = 8
	got := make([][]string, callers)
	errs := race(callers, func(i int) error {
		var err error
		got[i], err = rs[i%2].DeleteExpiredTokens(ctx, t0)
		return err
	})
	count := map[string]int{}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("sweeper %d: %v", i, err)
		}
		for _, id := range got[i] {
			count[id]++
		}
	}
	for _, id := range want {
		if count[id] != 1 {
			t.Fatalf("leaf %s reported %d times, want once", id, count[id])
		}
	}
	if len(count) != len(want) {
		t.Fatalf("%d leaves reported, want %d", len(count), len(want))
	}
}
