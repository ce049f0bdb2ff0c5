// Package storetest is the conformance suite for branchkey.Store: every
// metadata store (SQLite, PostgreSQL) runs the same tests, so a new backend is
// proven by them. It checks each method against the contract in branchkey.go,
// error codes included, and the concurrency guarantees the server relies on
// to aggregate each round exactly once.
package storetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
)

// Run runs the suite. open must return a fresh, empty store for each call;
// the suite closes it. Ids are unique per run anyway, so a backend may share
// one database between calls if it truly empties it.
func Run(t *testing.T, open func(tb testing.TB) branchkey.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, e *env)
	}{
		{"Ping", testPing},
		{"Trees", testTrees},
		{"Branches", testBranches},
		{"Leaves", testLeaves},
		{"SetLeafPassword", testSetLeafPassword},
		{"Tokens", testTokens},
		{"DeleteExpiredTokens", testDeleteExpiredTokens},
		{"DeleteExpiredTokensConcurrent", testDeleteExpiredTokensConcurrent},
		{"PutUpdate", testPutUpdate},
		{"PutUpdateReplaces", testPutUpdateReplaces},
		{"PutUpdateIdempotencyKey", testPutUpdateIdempotencyKey},
		{"PutUpdateCheck", testPutUpdateCheck},
		{"PutUpdateConflicts", testPutUpdateConflicts},
		{"PutUpdateConcurrent", testPutUpdateConcurrent},
		{"RoundCountsDistinctLeaves", testRoundCountsDistinctLeaves},
		{"CloseRound", testCloseRound},
		{"CloseRoundConcurrent", testCloseRoundConcurrent},
		{"OpenRounds", testOpenRounds},
		{"ClaimRound", testClaimRound},
		{"ClaimRoundConcurrent", testClaimRoundConcurrent},
		{"FinishRound", testFinishRound},
		{"FinishRoundAfterTakeover", testFinishRoundAfterTakeover},
		{"FailRound", testFailRound},
		{"Aggregations", testAggregations},
		{"SetRunStatus", testSetRunStatus},
		{"SetRunStatusAbortsOnMessageConflict", testSetRunStatusMessageConflict},
		{"Messages", testMessages},
		{"ClaimOutbox", testClaimOutbox},
		{"ClaimOutboxConcurrent", testClaimOutboxConcurrent},
		{"DeleteLeaf", testDeleteLeaf},
		{"DeleteBranch", testDeleteBranch},
		{"DeleteTree", testDeleteTree},
		{"Times", testTimes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() {
				if err := s.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
			})
			tt.fn(t, &env{t: t, s: s, ctx: context.Background(), prefix: randomHex(t, 4)})
		})
	}
}

// env is one test's store and helpers.
type env struct {
	t      *testing.T
	s      branchkey.Store
	ctx    context.Context
	prefix string
	mu     sync.Mutex
	n      int
}

func randomHex(t *testing.T, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// id returns an id no other test or run uses.
func (e *env) id(kind string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	return fmt.Sprintf("%s-%s-%d", kind, e.prefix, e.n)
}

// now is the current time at microsecond precision, which every backend
// keeps exactly.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// t0 is a fixed instant for claims and leases, so tests pass their own clock.
var t0 = time.Date(2031, 5, 6, 7, 8, 9, 123456000, time.UTC)

func wantCode(t *testing.T, err error, code string, what string) {
	t.Helper()
	if got := branchkey.ErrorCode(err); got != code {
		t.Fatalf("%s: error %v has code %q, want %q", what, err, got, code)
	}
}

func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func sameTime(t *testing.T, what string, got, want time.Time) {
	t.Helper()
	if !got.Equal(want) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

func (e *env) tree() *branchkey.Tree {
	e.t.Helper()
	tr := &branchkey.Tree{ID: e.id("tree"), CreatedAt: now()}
	must(e.t, e.s.CreateTree(e.ctx, tr), "create tree")
	return tr
}

func defaultPolicy() branchkey.Policy {
	return branchkey.Policy{MinUpdates: 2, Strategy: "fedavg"}
}

// branch creates a branch in a new tree with the given run status.
func (e *env) branch(status branchkey.RunStatus) *branchkey.Branch {
	e.t.Helper()
	return e.branchIn(e.tree().ID, status)
}

func (e *env) branchIn(treeID string, status branchkey.RunStatus) *branchkey.Branch {
	e.t.Helper()
	b := &branchkey.Branch{TreeID: treeID, ID: e.id("branch"), Policy: defaultPolicy(), RunStatus: status, CreatedAt: now()}
	must(e.t, e.s.CreateBranch(e.ctx, b), "create branch")
	return b
}

func (e *env) leaf(b *branchkey.Branch) *branchkey.Leaf {
	e.t.Helper()
	l := &branchkey.Leaf{ID: e.id("leaf"), TreeID: b.TreeID, BranchID: b.ID, Name: e.id("name"), PasswordHash: "hash", CreatedAt: now()}
	must(e.t, e.s.CreateLeaf(e.ctx, l), "create leaf")
	return l
}

func (e *env) newUpdate(l *branchkey.Leaf) *branchkey.Update {
	id := e.id("update")
	return &branchkey.Update{
		ID: id, TreeID: l.TreeID, BranchID: l.BranchID, LeafID: l.ID,
		NumSamples: 100, Size: 1234, BlobKey: "updates/" + l.TreeID + "/" + l.BranchID + "/" + id + ".npy",
		Signature: "f4:(2,3)", Filename: "w.npy", Metadata: `{"epoch":1}`, CreatedAt: now(),
	}
}

// put records a new update of l and returns it with the result.
func (e *env) put(l *branchkey.Leaf) (*branchkey.Update, *branchkey.PutResult) {
	e.t.Helper()
	u := e.newUpdate(l)
	res, err := e.s.PutUpdate(e.ctx, u, nil)
	must(e.t, err, "put update")
	return u, res
}

func key(b *branchkey.Branch, run, round int) branchkey.RoundKey {
	return branchkey.RoundKey{TreeID: b.TreeID, BranchID: b.ID, Run: run, Round: round}
}

func (e *env) round(k branchkey.RoundKey) *branchkey.Round {
	e.t.Helper()
	r, err := e.s.FindRound(e.ctx, k)
	must(e.t, err, "find round")
	return r
}

func (e *env) findBranch(b *branchkey.Branch) *branchkey.Branch {
	e.t.Helper()
	got, err := e.s.FindBranch(e.ctx, b.TreeID, b.ID)
	must(e.t, err, "find branch")
	return got
}

// closed returns a started branch whose round 1 holds updates of n leaves
// and is closed with all of them as inputs.
func (e *env) closed(n int) (*branchkey.Branch, []*branchkey.Update, *branchkey.Round) {
	e.t.Helper()
	b := e.branch(branchkey.RunStarted)
	var ups []*branchkey.Update
	for range n {
		u, _ := e.put(e.leaf(b))
		ups = append(ups, u)
	}
	r, err := e.s.CloseRound(e.ctx, key(b, 1, 1), "min_updates", nil)
	must(e.t, err, "close round")
	return b, ups, r
}

// aggregation returns an aggregation record for round k.
func (e *env) aggregation(k branchkey.RoundKey, inputs []string) *branchkey.Aggregation {
	id := e.id("agg")
	started := now()
	return &branchkey.Aggregation{
		ID: id, TreeID: k.TreeID, BranchID: k.BranchID, Run: k.Run, Round: k.Round,
		Inputs: inputs, NumSamples: 300, Strategy: "fedadam", Mode: "blocked", Size: 999,
		BlobKey: "aggregates/" + id + ".npy", StateKey: "state/" + id + ".npy",
		StartedAt: started, FinishedAt: started.Add(1500 * time.Millisecond), Duration: 1500 * time.Millisecond,
	}
}

// finish claims and finishes round k with messages and returns the record.
func (e *env) finish(k branchkey.RoundKey, inputs []string, msgs ...*branchkey.Message) *branchkey.Aggregation {
	e.t.Helper()
	_, err := e.s.ClaimRound(e.ctx, k, "finisher", t0, t0.Add(time.Minute))
	must(e.t, err, "claim round")
	a := e.aggregation(k, inputs)
	must(e.t, e.s.FinishRound(e.ctx, a, "finisher", msgs), "finish round")
	return a
}

func (e *env) message(b *branchkey.Branch, typ string) *branchkey.Message {
	return &branchkey.Message{
		ID: e.id("msg"), TreeID: b.TreeID, BranchID: b.ID, Type: typ,
		Body: json.RawMessage(`{"n":1}`), CreatedAt: now(),
	}
}

func ids[T any](xs []*T, id func(*T) string) []string {
	out := make([]string, 0, len(xs))
	for _, x := range xs {
		out = append(out, id(x))
	}
	return out
}

func updateIDs(us []*branchkey.Update) []string {
	return ids(us, func(u *branchkey.Update) string { return u.ID })
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

func sameSet(t *testing.T, what string, got, want []string) {
	t.Helper()
	if !slices.Equal(sorted(got), sorted(want)) {
		t.Fatalf("%s = %v, want %v (any order)", what, got, want)
	}
}

func sameList(t *testing.T, what string, got, want []string) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !slices.Equal(got, want) {
		t.Fatalf("%s = %v, want %v", what, got, want)
	}
}

// concurrently runs fn n times at once and returns the errors by index.
func concurrently(n int, fn func(i int) error) []error {
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

func testPing(t *testing.T, e *env) {
	must(t, e.s.Ping(e.ctx), "ping")
}

func testTrees(t *testing.T, e *env) {
	t.Run("CreateFind", func(t *testing.T) {
		tr := e.tree()
		got, err := e.s.FindTree(e.ctx, tr.ID)
		must(t, err, "find tree")
		if got.ID != tr.ID {
			t.Fatalf("found tree %q, want %q", got.ID, tr.ID)
		}
		sameTime(t, "CreatedAt", got.CreatedAt, tr.CreatedAt)
	})
	t.Run("CreatedAtDefaults", func(t *testing.T) {
		before := time.Now().Add(-time.Second)
		tr := &branchkey.Tree{ID: e.id("tree")}
		must(t, e.s.CreateTree(e.ctx, tr), "create tree")
		got, err := e.s.FindTree(e.ctx, tr.ID)
		must(t, err, "find tree")
		if got.CreatedAt.Before(before) || got.CreatedAt.After(time.Now().Add(time.Second)) {
			t.Fatalf("CreatedAt = %v, want about now", got.CreatedAt)
		}
	})
	t.Run("ErrExists", func(t *testing.T) {
		tr := e.tree()
		err := e.s.CreateTree(e.ctx, &branchkey.Tree{ID: tr.ID})
		wantCode(t, err, branchkey.ECONFLICT, "create an existing tree")
	})
	t.Run("ErrNotFound", func(t *testing.T) {
		_, err := e.s.FindTree(e.ctx, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "find a missing tree")
		_, _, err = e.s.DeleteTree(e.ctx, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "delete a missing tree")
	})
	t.Run("ListByID", func(t *testing.T) {
		before, err := e.s.ListTrees(e.ctx)
		must(t, err, "list trees")
		var made []string
		for _, id := range []string{"c", "a", "b"} {
			tr := &branchkey.Tree{ID: e.id("list") + id}
			must(t, e.s.CreateTree(e.ctx, tr), "create tree")
			made = append(made, tr.ID)
		}
		got, err := e.s.ListTrees(e.ctx)
		must(t, err, "list trees")
		gotIDs := ids(got, func(t *branchkey.Tree) string { return t.ID })
		if len(got) != len(before)+3 {
			t.Fatalf("listed %d trees, want %d", len(got), len(before)+3)
		}
		if !slices.IsSorted(gotIDs) {
			t.Fatalf("trees not by id: %v", gotIDs)
		}
		for _, id := range made {
			if !slices.Contains(gotIDs, id) {
				t.Fatalf("tree %q not listed", id)
			}
		}
	})
}

func testBranches(t *testing.T, e *env) {
	t.Run("CreateStartedOpensRound1", func(t *testing.T) {
		tr := e.tree()
		b := &branchkey.Branch{
			TreeID: tr.ID, ID: e.id("branch"), RunStatus: branchkey.RunStarted, CreatedAt: now(),
			Policy: branchkey.Policy{
				MinUpdates: 3, SampleSize: 2, MaxWait: 90 * time.Second, MinQuorum: 2,
				Strategy: "trimmed_mean", StrategyOptions: map[string]string{"trim": "0.1", "byzantine": "1"},
				AllowNonFinite: true,
			},
		}
		must(t, e.s.CreateBranch(e.ctx, b), "create branch")
		got := e.findBranch(b)
		if got.RunNumber != 1 || got.Round != 1 {
			t.Fatalf("a started branch is at run %d round %d, want 1, 1", got.RunNumber, got.Round)
		}
		if got.RunStatus != branchkey.RunStarted {
			t.Fatalf("RunStatus = %q", got.RunStatus)
		}
		if !reflect.DeepEqual(got.Policy, b.Policy) {
			t.Fatalf("Policy = %+v, want %+v", got.Policy, b.Policy)
		}
		sameTime(t, "CreatedAt", got.CreatedAt, b.CreatedAt)
		r := e.round(key(b, 1, 1))
		if r.Status != branchkey.RoundOpen || r.Count != 0 {
			t.Fatalf("round 1 is %s with %d updates, want open with 0", r.Status, r.Count)
		}
	})
	t.Run("CreatePausedHasNoOpenRound", func(t *testing.T) {
		b := e.branch(branchkey.RunPaused)
		got := e.findBranch(b)
		if got.RunStatus != branchkey.RunPaused {
			t.Fatalf("RunStatus = %q", got.RunStatus)
		}
		if got.RunNumber == 1 && got.Round == 1 {
			if r, err := e.s.FindRound(e.ctx, key(b, 1, 1)); err == nil && r.Status == branchkey.RoundOpen && r.Count > 0 {
				t.Fatalf("a paused new branch has an open round with updates")
			}
		}
	})
	t.Run("ErrTreeNotFound", func(t *testing.T) {
		err := e.s.CreateBranch(e.ctx, &branchkey.Branch{TreeID: e.id("missing"), ID: e.id("branch"), Policy: defaultPolicy(), RunStatus: branchkey.RunStarted})
		wantCode(t, err, branchkey.ENOTFOUND, "create a branch in a missing tree")
	})
	t.Run("ErrExists", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		err := e.s.CreateBranch(e.ctx, &branchkey.Branch{TreeID: b.TreeID, ID: b.ID, Policy: defaultPolicy(), RunStatus: branchkey.RunStarted})
		wantCode(t, err, branchkey.ECONFLICT, "create an existing branch")
	})
	t.Run("SameIDInTwoTrees", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		other := e.tree()
		b2 := &branchkey.Branch{TreeID: other.ID, ID: b.ID, Policy: defaultPolicy(), RunStatus: branchkey.RunStarted}
		must(t, e.s.CreateBranch(e.ctx, b2), "create a branch with the same id in another tree")
	})
	t.Run("ErrNotFound", func(t *testing.T) {
		tr := e.tree()
		_, err := e.s.FindBranch(e.ctx, tr.ID, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "find a missing branch")
		_, _, err = e.s.DeleteBranch(e.ctx, tr.ID, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "delete a missing branch")
		_, err = e.s.SetRunStatus(e.ctx, tr.ID, e.id("missing"), branchkey.RunPaused, nil)
		wantCode(t, err, branchkey.ENOTFOUND, "set the run status of a missing branch")
	})
	t.Run("List", func(t *testing.T) {
		tr1, tr2 := e.tree(), e.tree()
		var in1 []string
		for _, suffix := range []string{"z", "a", "m"} {
			b := &branchkey.Branch{TreeID: tr1.ID, ID: e.id("b") + suffix, Policy: defaultPolicy(), RunStatus: branchkey.RunStarted}
			must(t, e.s.CreateBranch(e.ctx, b), "create branch")
			in1 = append(in1, b.ID)
		}
		b2 := e.branchIn(tr2.ID, branchkey.RunPaused)

		got, err := e.s.ListBranches(e.ctx, tr1.ID)
		must(t, err, "list branches")
		gotIDs := ids(got, func(b *branchkey.Branch) string { return b.ID })
		sameList(t, "branches of tree 1", gotIDs, sorted(in1))

		all, err := e.s.ListBranches(e.ctx, "")
		must(t, err, "list all branches")
		var keys []string
		for _, b := range all {
			keys = append(keys, b.TreeID+"\x00"+b.ID)
		}
		for _, k := range append(slices.Clone(in1), b2.ID) {
			found := false
			for _, b := range all {
				found = found || b.ID == k
			}
			if !found {
				t.Fatalf("branch %q missing from the list of all branches", k)
			}
		}
		if !slices.IsSorted(keys) {
			t.Fatalf("all branches not by tree and id: %v", keys)
		}
		none, err := e.s.ListBranches(e.ctx, e.id("missing"))
		must(t, err, "list branches of a missing tree")
		if len(none) != 0 {
			t.Fatalf("listed %d branches of a missing tree", len(none))
		}
	})
}

func testLeaves(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	t.Run("CreateFind", func(t *testing.T) {
		l := e.leaf(b)
		for name, find := range map[string]func() (*branchkey.Leaf, error){
			"FindLeaf":       func() (*branchkey.Leaf, error) { return e.s.FindLeaf(e.ctx, l.ID) },
			"FindLeafByName": func() (*branchkey.Leaf, error) { return e.s.FindLeafByName(e.ctx, l.Name) },
		} {
			got, err := find()
			must(t, err, name)
			if got.ID != l.ID || got.TreeID != l.TreeID || got.BranchID != l.BranchID || got.Name != l.Name || got.PasswordHash != l.PasswordHash {
				t.Fatalf("%s = %+v, want %+v", name, got, l)
			}
			sameTime(t, name+" CreatedAt", got.CreatedAt, l.CreatedAt)
		}
	})
	t.Run("ErrNotFound", func(t *testing.T) {
		_, err := e.s.FindLeaf(e.ctx, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "find a missing leaf")
		_, err = e.s.FindLeafByName(e.ctx, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "find a missing leaf name")
		_, err = e.s.DeleteLeaf(e.ctx, e.id("missing"))
		wantCode(t, err, branchkey.ENOTFOUND, "delete a missing leaf")
	})
	t.Run("ErrBranchNotFound", func(t *testing.T) {
		err := e.s.CreateLeaf(e.ctx, &branchkey.Leaf{ID: e.id("leaf"), TreeID: b.TreeID, BranchID: e.id("missing"), Name: e.id("name")})
		wantCode(t, err, branchkey.ENOTFOUND, "create a leaf in a missing branch")
	})
	t.Run("ErrIDTaken", func(t *testing.T) {
		l := e.leaf(b)
		err := e.s.CreateLeaf(e.ctx, &branchkey.Leaf{ID: l.ID, TreeID: b.TreeID, BranchID: b.ID, Name: e.id("name")})
		wantCode(t, err, branchkey.ECONFLICT, "create a leaf with a taken id")
	})
	t.Run("ErrNameTakenAcrossServer", func(t *testing.T) {
		l := e.leaf(b)
		other := e.branch(branchkey.RunStarted)
		err := e.s.CreateLeaf(e.ctx, &branchkey.Leaf{ID: e.id("leaf"), TreeID: other.TreeID, BranchID: other.ID, Name: l.Name})
		wantCode(t, err, branchkey.ECONFLICT, "create a leaf with a name taken in another tree")
	})
	t.Run("ListByName", func(t *testing.T) {
		lb := e.branch(branchkey.RunStarted)
		var names []string
		for _, n := range []string{"zed", "amy", "kim"} {
			l := &branchkey.Leaf{ID: e.id("leaf"), TreeID: lb.TreeID, BranchID: lb.ID, Name: n + e.id("")}
			must(t, e.s.CreateLeaf(e.ctx, l), "create leaf")
			names = append(names, l.Name)
		}
		e.leaf(b) // in another branch
		got, err := e.s.ListLeaves(e.ctx, lb.TreeID, lb.ID)
		must(t, err, "list leaves")
		sameList(t, "leaves by name", ids(got, func(l *branchkey.Leaf) string { return l.Name }), sorted(names))
	})
}

func testSetLeafPassword(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l := e.leaf(b)
	other := e.leaf(b)
	for _, tok := range []*branchkey.Token{
		{Hash: e.id("tok"), LeafID: l.ID, ExpiresAt: now().Add(time.Hour)},
		{Hash: e.id("tok"), LeafID: l.ID, ExpiresAt: now().Add(time.Hour)},
		{Hash: e.id("tok"), LeafID: other.ID, ExpiresAt: now().Add(time.Hour)},
	} {
		must(t, e.s.CreateToken(e.ctx, tok), "create token")
		defer func(tok *branchkey.Token) {
			_, err := e.s.FindToken(e.ctx, tok.Hash)
			if tok.LeafID == l.ID {
				wantCode(t, err, branchkey.ENOTFOUND, "find a token revoked by a password change")
			} else if err != nil {
				t.Fatalf("another leaf's token is gone: %v", err)
			}
		}(tok)
	}
	must(t, e.s.SetLeafPassword(e.ctx, l.ID, "new-hash"), "set password")
	got, err := e.s.FindLeaf(e.ctx, l.ID)
	must(t, err, "find leaf")
	if got.PasswordHash != "new-hash" {
		t.Fatalf("PasswordHash = %q, want new-hash", got.PasswordHash)
	}
	wantCode(t, e.s.SetLeafPassword(e.ctx, e.id("missing"), "x"), branchkey.ENOTFOUND, "set the password of a missing leaf")
}

func testTokens(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l := e.leaf(b)
	tok := &branchkey.Token{Hash: e.id("tok"), LeafID: l.ID, CreatedAt: now(), ExpiresAt: now().Add(time.Hour)}
	must(t, e.s.CreateToken(e.ctx, tok), "create token")
	got, err := e.s.FindToken(e.ctx, tok.Hash)
	must(t, err, "find token")
	if got.Hash != tok.Hash || got.LeafID != l.ID {
		t.Fatalf("FindToken = %+v, want %+v", got, tok)
	}
	sameTime(t, "CreatedAt", got.CreatedAt, tok.CreatedAt)
	sameTime(t, "ExpiresAt", got.ExpiresAt, tok.ExpiresAt)

	_, err = e.s.FindToken(e.ctx, e.id("missing"))
	wantCode(t, err, branchkey.ENOTFOUND, "find a missing token")

	err = e.s.CreateToken(e.ctx, &branchkey.Token{Hash: e.id("tok"), LeafID: e.id("missing"), ExpiresAt: now().Add(time.Hour)})
	wantCode(t, err, branchkey.ENOTFOUND, "create a token of a missing leaf")

	expired := &branchkey.Token{Hash: e.id("tok"), LeafID: l.ID, ExpiresAt: now().Add(-time.Hour)}
	must(t, e.s.CreateToken(e.ctx, expired), "create an expired token")
	if _, err := e.s.FindToken(e.ctx, expired.Hash); err != nil {
		t.Fatalf("FindToken of an expired token: %v (the caller checks expiry)", err)
	}

	must(t, e.s.RevokeTokens(e.ctx, l.ID), "revoke tokens")
	for _, h := range []string{tok.Hash, expired.Hash} {
		_, err = e.s.FindToken(e.ctx, h)
		wantCode(t, err, branchkey.ENOTFOUND, "find a revoked token")
	}
	must(t, e.s.RevokeTokens(e.ctx, e.id("missing")), "revoke the tokens of a leaf with none")
}

func testDeleteExpiredTokens(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	onlyExpired, mixed, onlyValid := e.leaf(b), e.leaf(b), e.leaf(b)
	e.leaf(b) // a leaf with no token at all is not reported: it lost nothing
	at := t0
	mk := func(l *branchkey.Leaf, expires time.Time) *branchkey.Token {
		tok := &branchkey.Token{Hash: e.id("tok"), LeafID: l.ID, CreatedAt: at.Add(-2 * time.Hour), ExpiresAt: expires}
		must(t, e.s.CreateToken(e.ctx, tok), "create token")
		return tok
	}
	gone := []*branchkey.Token{
		mk(onlyExpired, at.Add(-time.Minute)),
		mk(onlyExpired, at.Add(-time.Microsecond)),
		mk(mixed, at.Add(-time.Minute)),
	}
	kept := []*branchkey.Token{mk(mixed, at.Add(time.Minute)), mk(onlyValid, at.Add(time.Hour)), mk(onlyValid, at)}

	leaves, err := e.s.DeleteExpiredTokens(e.ctx, at)
	must(t, err, "delete expired tokens")
	sameSet(t, "leaves left with no valid token", leaves, []string{onlyExpired.ID})
	for _, tok := range gone {
		_, err := e.s.FindToken(e.ctx, tok.Hash)
		wantCode(t, err, branchkey.ENOTFOUND, "find an expired token after the sweep")
	}
	for _, tok := range kept {
		_, err := e.s.FindToken(e.ctx, tok.Hash)
		must(t, err, "find a valid token after the sweep")
	}

	leaves, err = e.s.DeleteExpiredTokens(e.ctx, at)
	must(t, err, "delete expired tokens again")
	if len(leaves) != 0 {
		t.Fatalf("a second sweep reported %v again", leaves)
	}

	// Later the mixed leaf's last token expires too.
	leaves, err = e.s.DeleteExpiredTokens(e.ctx, at.Add(2*time.Minute))
	must(t, err, "delete expired tokens later")
	sameSet(t, "leaves left with no valid token later", leaves, []string{mixed.ID})
}

func testDeleteExpiredTokensConcurrent(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	var want []string
	for range 12 {
		l := e.leaf(b)
		want = append(want, l.ID)
		for j := range 3 {
			tok := &branchkey.Token{Hash: e.id("tok"), LeafID: l.ID, ExpiresAt: t0.Add(-time.Duration(j+1) * time.Minute)}
			must(t, e.s.CreateToken(e.ctx, tok), "create token")
		}
	}
	const callers = 8
	results := make([][]string, callers)
	errs := concurrently(callers, func(i int) error {
		var err error
		results[i], err = e.s.DeleteExpiredTokens(e.ctx, t0)
		return err
	})
	var all []string
	for i, err := range errs {
		must(t, err, fmt.Sprintf("caller %d", i))
		all = append(all, results[i]...)
	}
	sameList(t, "leaves reported across callers", sorted(all), sorted(want))
}

func testPutUpdate(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l := e.leaf(b)
	u := e.newUpdate(l)
	res, err := e.s.PutUpdate(e.ctx, u, nil)
	must(t, err, "put update")
	if u.Run != 1 || u.Round != 1 {
		t.Fatalf("PutUpdate filled run %d round %d, want 1, 1", u.Run, u.Round)
	}
	if res.Existing != nil || res.Replaced != nil {
		t.Fatalf("first update: Existing %v, Replaced %v", res.Existing, res.Replaced)
	}
	r := res.Round
	if r == nil || r.RoundKey != key(b, 1, 1) || r.Status != branchkey.RoundOpen || r.Count != 1 {
		t.Fatalf("result round = %+v, want open round 1 of run 1 with 1 update", r)
	}
	if r.Signature != u.Signature {
		t.Fatalf("round signature = %q, want the first update's %q", r.Signature, u.Signature)
	}
	if r.FirstUpdateAt.IsZero() {
		t.Fatal("round FirstUpdateAt is not set")
	}

	got, err := e.s.FindUpdate(e.ctx, u.ID)
	must(t, err, "find update")
	if got.ID != u.ID || got.TreeID != u.TreeID || got.BranchID != u.BranchID || got.LeafID != u.LeafID ||
		got.Run != 1 || got.Round != 1 || got.NumSamples != u.NumSamples || got.Size != u.Size ||
		got.BlobKey != u.BlobKey || got.Signature != u.Signature || got.Filename != u.Filename ||
		got.Metadata != u.Metadata || got.Superseded {
		t.Fatalf("FindUpdate = %+v, want %+v", got, u)
	}
	sameTime(t, "CreatedAt", got.CreatedAt, u.CreatedAt)
	_, err = e.s.FindUpdate(e.ctx, e.id("missing"))
	wantCode(t, err, branchkey.ENOTFOUND, "find a missing update")

	// A second leaf: the first update's signature and time stay the round's.
	u2 := e.newUpdate(e.leaf(b))
	u2.Signature = "other"
	u2.CreatedAt = u.CreatedAt.Add(time.Second)
	res2, err := e.s.PutUpdate(e.ctx, u2, nil)
	must(t, err, "put a second update")
	if res2.Round.Signature != u.Signature || res2.Round.Count != 2 {
		t.Fatalf("after a second update the round has signature %q and %d updates", res2.Round.Signature, res2.Round.Count)
	}
	sameTime(t, "FirstUpdateAt after a second update", res2.Round.FirstUpdateAt, r.FirstUpdateAt)

	ups, err := e.s.RoundUpdates(e.ctx, key(b, 1, 1))
	must(t, err, "round updates")
	sameList(t, "round updates by id", updateIDs(ups), sorted([]string{u.ID, u2.ID}))
}

func testPutUpdateReplaces(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l, other := e.leaf(b), e.leaf(b)
	first, _ := e.put(l)
	o, _ := e.put(other)
	second := e.newUpdate(l)
	res, err := e.s.PutUpdate(e.ctx, second, nil)
	must(t, err, "put a replacement")
	if res.Replaced == nil || res.Replaced.ID != first.ID {
		t.Fatalf("Replaced = %+v, want update %q", res.Replaced, first.ID)
	}
	if !res.Replaced.Superseded {
		t.Fatal("Replaced.Superseded is false")
	}
	if res.Existing != nil {
		t.Fatalf("Existing = %+v on a replacement", res.Existing)
	}
	if res.Round.Count != 2 {
		t.Fatalf("round Count = %d after a replacement, want 2", res.Round.Count)
	}
	got, err := e.s.FindUpdate(e.ctx, first.ID)
	must(t, err, "find the replaced update")
	if !got.Superseded {
		t.Fatal("the replaced update is not superseded")
	}
	ups, err := e.s.RoundUpdates(e.ctx, key(b, 1, 1))
	must(t, err, "round updates")
	sameList(t, "current updates", updateIDs(ups), sorted([]string{second.ID, o.ID}))

	// The same leaf in the next round replaces nothing.
	_, err = e.s.CloseRound(e.ctx, key(b, 1, 1), "min_updates", nil)
	must(t, err, "close round")
	third := e.newUpdate(l)
	res, err = e.s.PutUpdate(e.ctx, third, nil)
	must(t, err, "put into round 2")
	if res.Replaced != nil || third.Round != 2 {
		t.Fatalf("an update in round 2 replaced %+v (round %d)", res.Replaced, third.Round)
	}
}

func testPutUpdateIdempotencyKey(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l := e.leaf(b)
	u := e.newUpdate(l)
	u.IdempotencyKey = "retry-1"
	_, err := e.s.PutUpdate(e.ctx, u, nil)
	must(t, err, "put update")

	got, err := e.s.FindUpdateByKey(e.ctx, l.ID, "retry-1")
	must(t, err, "find update by key")
	if got.ID != u.ID {
		t.Fatalf("FindUpdateByKey = %q, want %q", got.ID, u.ID)
	}
	_, err = e.s.FindUpdateByKey(e.ctx, l.ID, "other")
	wantCode(t, err, branchkey.ENOTFOUND, "find by a missing key")
	other := e.leaf(b)
	_, err = e.s.FindUpdateByKey(e.ctx, other.ID, "retry-1")
	wantCode(t, err, branchkey.ENOTFOUND, "find by another leaf's key")

	retry := e.newUpdate(l)
	retry.IdempotencyKey = "retry-1"
	checked := false
	res, err := e.s.PutUpdate(e.ctx, retry, func(*branchkey.Round) error { checked = true; return nil })
	must(t, err, "retry")
	if res.Existing == nil || res.Existing.ID != u.ID {
		t.Fatalf("Existing = %+v, want update %q", res.Existing, u.ID)
	}
	if res.Replaced != nil {
		t.Fatalf("a retry replaced %+v", res.Replaced)
	}
	_ = checked // whether check runs on a retry is the implementation's choice
	_, err = e.s.FindUpdate(e.ctx, retry.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "find the retry's own id")
	if r := e.round(key(b, 1, 1)); r.Count != 1 {
		t.Fatalf("round Count = %d after a retry, want 1", r.Count)
	}
	if g, _ := e.s.FindUpdate(e.ctx, u.ID); g == nil || g.Superseded {
		t.Fatal("a retry superseded the original")
	}

	// Another leaf may use the same key.
	v := e.newUpdate(other)
	v.IdempotencyKey = "retry-1"
	res, err = e.s.PutUpdate(e.ctx, v, nil)
	must(t, err, "another leaf with the same key")
	if res.Existing != nil {
		t.Fatalf("another leaf's key matched %+v", res.Existing)
	}

	// A retry arriving after the run paused still gets its answer.
	_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, nil)
	must(t, err, "pause")
	late := e.newUpdate(l)
	late.IdempotencyKey = "retry-1"
	res, err = e.s.PutUpdate(e.ctx, late, nil)
	must(t, err, "retry while paused")
	if res.Existing == nil || res.Existing.ID != u.ID {
		t.Fatalf("retry while paused: Existing = %+v, want %q", res.Existing, u.ID)
	}
}

func testPutUpdateCheck(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l1, l2 := e.leaf(b), e.leaf(b)

	var seen []*branchkey.Round
	record := func(r *branchkey.Round) error { seen = append(seen, r); return nil }
	u1 := e.newUpdate(l1)
	_, err := e.s.PutUpdate(e.ctx, u1, record)
	must(t, err, "put with check")
	u2 := e.newUpdate(l2)
	_, err = e.s.PutUpdate(e.ctx, u2, record)
	must(t, err, "put with check")
	if len(seen) != 2 || seen[0].Count != 0 || seen[1].Count != 1 {
		t.Fatalf("check saw counts %v, want the round before each update: 0 then 1", ids(seen, func(r *branchkey.Round) string { return fmt.Sprint(r.Count) }))
	}
	if seen[0].RoundKey != key(b, 1, 1) || seen[0].Status != branchkey.RoundOpen {
		t.Fatalf("check saw %+v, want open round 1 of run 1", seen[0])
	}
	if seen[1].Signature != u1.Signature {
		t.Fatalf("check saw signature %q, want the first update's", seen[1].Signature)
	}

	errShape := branchkey.Errorf(branchkey.EINVALID, "tensor 0 has shape (2, 3), the round expects (3, 3)")
	bad := e.newUpdate(l1)
	_, err = e.s.PutUpdate(e.ctx, bad, func(*branchkey.Round) error { return errShape })
	if !errors.Is(err, errShape) {
		t.Fatalf("PutUpdate with a failing check = %v, want the check's error", err)
	}
	wantCode(t, err, branchkey.EINVALID, "failing check")
	_, err = e.s.FindUpdate(e.ctx, bad.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "find an update whose check failed")
	if g, _ := e.s.FindUpdate(e.ctx, u1.ID); g == nil || g.Superseded {
		t.Fatal("a failed check superseded the leaf's earlier update")
	}
	if r := e.round(key(b, 1, 1)); r.Count != 2 {
		t.Fatalf("round Count = %d after a failed check, want 2", r.Count)
	}

	plain := errors.New("plain failure")
	_, err = e.s.PutUpdate(e.ctx, e.newUpdate(l1), func(*branchkey.Round) error { return plain })
	if !errors.Is(err, plain) {
		t.Fatalf("PutUpdate with a failing check = %v, want the check's error", err)
	}
}

func testPutUpdateConflicts(t *testing.T, e *env) {
	t.Run("Paused", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		l := e.leaf(b)
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, nil)
		must(t, err, "pause")
		u := e.newUpdate(l)
		_, err = e.s.PutUpdate(e.ctx, u, func(*branchkey.Round) error { t.Fatal("check ran on a paused run"); return nil })
		wantCode(t, err, branchkey.ECONFLICT, "put into a paused run")
		_, err = e.s.FindUpdate(e.ctx, u.ID)
		wantCode(t, err, branchkey.ENOTFOUND, "find an update refused while paused")
	})
	t.Run("Stopped", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		l := e.leaf(b)
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStopped, nil)
		must(t, err, "stop")
		_, err = e.s.PutUpdate(e.ctx, e.newUpdate(l), nil)
		wantCode(t, err, branchkey.ECONFLICT, "put into a stopped run")
	})
	t.Run("CreatedPaused", func(t *testing.T) {
		b := e.branch(branchkey.RunPaused)
		_, err := e.s.PutUpdate(e.ctx, e.newUpdate(e.leaf(b)), nil)
		wantCode(t, err, branchkey.ECONFLICT, "put into a branch created paused")
	})
	t.Run("DuplicateID", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		u, _ := e.put(e.leaf(b))
		dup := e.newUpdate(e.leaf(b))
		dup.ID = u.ID
		_, err := e.s.PutUpdate(e.ctx, dup, nil)
		wantCode(t, err, branchkey.ECONFLICT, "put an update with a taken id")
	})
	t.Run("BranchNotFound", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		u := e.newUpdate(e.leaf(b))
		u.BranchID = e.id("missing")
		_, err := e.s.PutUpdate(e.ctx, u, nil)
		wantCode(t, err, branchkey.ENOTFOUND, "put into a missing branch")
	})
	t.Run("LeafNotFound", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		u := e.newUpdate(e.leaf(b))
		u.LeafID = e.id("missing")
		_, err := e.s.PutUpdate(e.ctx, u, nil)
		wantCode(t, err, branchkey.ENOTFOUND, "put for a missing leaf")
	})
}

func testPutUpdateConcurrent(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	const n = 16
	leaves := make([]*branchkey.Leaf, n)
	for i := range leaves {
		leaves[i] = e.leaf(b)
	}
	errs := concurrently(2*n, func(i int) error {
		_, err := e.s.PutUpdate(e.ctx, e.newUpdate(leaves[i%n]), nil)
		return err
	})
	for i, err := range errs {
		must(t, err, fmt.Sprintf("put %d", i))
	}
	r := e.round(key(b, 1, 1))
	if r.Count != n {
		t.Fatalf("round Count = %d after two concurrent uploads by each of %d leaves, want %d", r.Count, n, n)
	}
	ups, err := e.s.RoundUpdates(e.ctx, key(b, 1, 1))
	must(t, err, "round updates")
	if len(ups) != n {
		t.Fatalf("%d current updates, want one per leaf (%d)", len(ups), n)
	}
}

func testRoundCountsDistinctLeaves(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l1, l2, l3 := e.leaf(b), e.leaf(b), e.leaf(b)
	e.put(l1)
	e.put(l1)
	e.put(l2)
	e.put(l1)
	_, res := e.put(l3)
	if res.Round.Count != 3 {
		t.Fatalf("PutResult round Count = %d, want 3 distinct leaves", res.Round.Count)
	}
	if r := e.round(key(b, 1, 1)); r.Count != 3 {
		t.Fatalf("FindRound Count = %d, want 3 distinct leaves", r.Count)
	}
	open, err := e.s.OpenRounds(e.ctx)
	must(t, err, "open rounds")
	for _, r := range open {
		if r.RoundKey == key(b, 1, 1) && r.Count != 3 {
			t.Fatalf("OpenRounds Count = %d, want 3", r.Count)
		}
	}
}

func testCloseRound(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l1, l2, l3 := e.leaf(b), e.leaf(b), e.leaf(b)
	u1, _ := e.put(l1)
	u2, _ := e.put(l2)
	e.put(l3)
	u3, _ := e.put(l3) // replaces l3's first

	k := key(b, 1, 1)
	t.Run("PickErrorAborts", func(t *testing.T) {
		boom := errors.New("boom")
		_, err := e.s.CloseRound(e.ctx, k, "min_updates", func([]*branchkey.Update) ([]string, error) { return nil, boom })
		if !errors.Is(err, boom) {
			t.Fatalf("CloseRound with a failing pick = %v, want boom", err)
		}
		if r := e.round(k); r.Status != branchkey.RoundOpen {
			t.Fatalf("round is %s after a failed pick, want open", r.Status)
		}
		if got := e.findBranch(b); got.Round != 1 {
			t.Fatalf("branch round = %d after a failed pick, want 1", got.Round)
		}
	})
	t.Run("WrongRound", func(t *testing.T) {
		_, err := e.s.CloseRound(e.ctx, key(b, 1, 2), "min_updates", nil)
		if c := branchkey.ErrorCode(err); c != branchkey.ECONFLICT && c != branchkey.ENOTFOUND {
			t.Fatalf("close a future round = %v, want ECONFLICT or ENOTFOUND", err)
		}
		_, err = e.s.CloseRound(e.ctx, key(b, 2, 1), "min_updates", nil)
		if c := branchkey.ErrorCode(err); c != branchkey.ECONFLICT && c != branchkey.ENOTFOUND {
			t.Fatalf("close a round of another run = %v, want ECONFLICT or ENOTFOUND", err)
		}
		_, err = e.s.CloseRound(e.ctx, branchkey.RoundKey{TreeID: b.TreeID, BranchID: e.id("missing"), Run: 1, Round: 1}, "min_updates", nil)
		wantCode(t, err, branchkey.ENOTFOUND, "close a round of a missing branch")
	})

	var picked []*branchkey.Update
	before := time.Now().Add(-time.Second)
	r, err := e.s.CloseRound(e.ctx, k, "max_wait", func(ups []*branchkey.Update) ([]string, error) {
		picked = ups
		return []string{u3.ID, u1.ID}, nil
	})
	must(t, err, "close round")
	sameList(t, "updates given to pick", updateIDs(picked), sorted([]string{u1.ID, u2.ID, u3.ID}))
	if r.Status != branchkey.RoundClosed || r.Trigger != "max_wait" || r.RoundKey != k {
		t.Fatalf("closed round = %+v", r)
	}
	sameList(t, "Inputs", r.Inputs, []string{u3.ID, u1.ID})
	if r.ClosedAt.Before(before) {
		t.Fatalf("ClosedAt = %v, want about now", r.ClosedAt)
	}
	if r.Count != 3 {
		t.Fatalf("closed round Count = %d, want 3", r.Count)
	}
	found := e.round(k)
	if found.Status != branchkey.RoundClosed || !slices.Equal(found.Inputs, []string{u3.ID, u1.ID}) || found.Trigger != "max_wait" {
		t.Fatalf("FindRound after close = %+v", found)
	}
	sameTime(t, "ClosedAt", found.ClosedAt, r.ClosedAt)

	if got := e.findBranch(b); got.Round != 2 || got.RunNumber != 1 {
		t.Fatalf("branch at run %d round %d after the close, want 1, 2", got.RunNumber, got.Round)
	}
	if next := e.round(key(b, 1, 2)); next.Status != branchkey.RoundOpen || next.Count != 0 {
		t.Fatalf("round 2 = %+v, want open and empty", next)
	}

	_, err = e.s.CloseRound(e.ctx, k, "min_updates", nil)
	wantCode(t, err, branchkey.ECONFLICT, "close a closed round")

	u4 := e.newUpdate(l1)
	res, err := e.s.PutUpdate(e.ctx, u4, nil)
	must(t, err, "put after the close")
	if u4.Round != 2 || res.Replaced != nil || res.Round.Count != 1 {
		t.Fatalf("update after the close went to round %d (Replaced %v, Count %d), want round 2", u4.Round, res.Replaced, res.Round.Count)
	}
	if r := e.round(k); r.Count != 3 {
		t.Fatalf("the closed round's Count changed to %d", r.Count)
	}

	t.Run("NilPickTakesAll", func(t *testing.T) {
		u5, _ := e.put(l2)
		r, err := e.s.CloseRound(e.ctx, key(b, 1, 2), "min_updates", nil)
		must(t, err, "close round 2")
		sameSet(t, "Inputs with a nil pick", r.Inputs, []string{u4.ID, u5.ID})
	})
}

func testCloseRoundConcurrent(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	for range 3 {
		e.put(e.leaf(b))
	}
	const n = 16
	var picks sync.Map
	errs := concurrently(n, func(i int) error {
		_, err := e.s.CloseRound(e.ctx, key(b, 1, 1), "min_updates", func(ups []*branchkey.Update) ([]string, error) {
			picks.Store(i, true)
			return updateIDs(ups), nil
		})
		return err
	})
	ok := 0
	for i, err := range errs {
		switch branchkey.ErrorCode(err) {
		case "":
			ok++
		case branchkey.ECONFLICT:
		default:
			t.Fatalf("closer %d: %v, want nil or ECONFLICT", i, err)
		}
	}
	if ok != 1 {
		t.Fatalf("%d of %d concurrent CloseRound calls succeeded, want exactly 1", ok, n)
	}
	if got := e.findBranch(b); got.Round != 2 {
		t.Fatalf("branch round = %d after concurrent closes, want 2", got.Round)
	}
	if r := e.round(key(b, 1, 1)); r.Status != branchkey.RoundClosed || len(r.Inputs) != 3 {
		t.Fatalf("round 1 = %+v, want closed with 3 inputs", r)
	}
	if r, err := e.s.FindRound(e.ctx, key(b, 1, 3)); err == nil {
		t.Fatalf("a third round exists: %+v", r)
	}
}

func testOpenRounds(t *testing.T, e *env) {
	withUpdate := e.branch(branchkey.RunStarted)
	e.put(e.leaf(withUpdate))
	empty := e.branch(branchkey.RunStarted)
	e.leaf(empty)
	closedB, _, _ := e.closed(2)

	rounds, err := e.s.OpenRounds(e.ctx)
	must(t, err, "open rounds")
	var got []branchkey.RoundKey
	for _, r := range rounds {
		if r.Status != branchkey.RoundOpen || r.Count < 1 {
			t.Fatalf("OpenRounds returned %+v", r)
		}
		got = append(got, r.RoundKey)
	}
	if !slices.Contains(got, key(withUpdate, 1, 1)) {
		t.Fatalf("OpenRounds = %v, missing the round with an update", got)
	}
	for _, k := range []branchkey.RoundKey{key(empty, 1, 1), key(closedB, 1, 1), key(closedB, 1, 2)} {
		if slices.Contains(got, k) {
			t.Fatalf("OpenRounds includes %+v", k)
		}
	}
}

func testClaimRound(t *testing.T, e *env) {
	b, _, _ := e.closed(2)
	k := key(b, 1, 1)

	_, err := e.s.ClaimRound(e.ctx, key(b, 1, 2), "a", t0, t0.Add(time.Minute))
	wantCode(t, err, branchkey.ECONFLICT, "claim an open round")
	_, err = e.s.ClaimRound(e.ctx, key(b, 1, 9), "a", t0, t0.Add(time.Minute))
	wantCode(t, err, branchkey.ENOTFOUND, "claim a missing round")

	pending, err := e.s.PendingRounds(e.ctx, t0)
	must(t, err, "pending rounds")
	if !containsRound(pending, k) {
		t.Fatal("an unclaimed closed round is not pending")
	}

	r, err := e.s.ClaimRound(e.ctx, k, "a", t0, t0.Add(time.Minute))
	must(t, err, "claim")
	if r.ClaimOwner != "a" {
		t.Fatalf("ClaimOwner = %q, want a", r.ClaimOwner)
	}
	sameTime(t, "ClaimUntil", r.ClaimUntil, t0.Add(time.Minute))

	_, err = e.s.ClaimRound(e.ctx, k, "b", t0.Add(30*time.Second), t0.Add(2*time.Minute))
	wantCode(t, err, branchkey.ECONFLICT, "claim a round someone else holds")
	pending, err = e.s.PendingRounds(e.ctx, t0.Add(30*time.Second))
	must(t, err, "pending rounds")
	if containsRound(pending, k) {
		t.Fatal("a claimed round is pending before its claim expires")
	}

	// The holder may renew.
	_, err = e.s.ClaimRound(e.ctx, k, "a", t0.Add(30*time.Second), t0.Add(90*time.Second))
	must(t, err, "renew a claim")

	// After expiry the round is pending again and another owner takes it.
	pending, err = e.s.PendingRounds(e.ctx, t0.Add(91*time.Second))
	must(t, err, "pending rounds after expiry")
	if !containsRound(pending, k) {
		t.Fatal("a round whose claim expired is not pending")
	}
	r, err = e.s.ClaimRound(e.ctx, k, "b", t0.Add(91*time.Second), t0.Add(3*time.Minute))
	must(t, err, "take over an expired claim")
	if r.ClaimOwner != "b" {
		t.Fatalf("ClaimOwner after takeover = %q, want b", r.ClaimOwner)
	}
	_, err = e.s.ClaimRound(e.ctx, k, "a", t0.Add(92*time.Second), t0.Add(4*time.Minute))
	wantCode(t, err, branchkey.ECONFLICT, "the former owner claims again")
}

func containsRound(rs []*branchkey.Round, k branchkey.RoundKey) bool {
	for _, r := range rs {
		if r.RoundKey == k {
			return true
		}
	}
	return false
}

func testClaimRoundConcurrent(t *testing.T, e *env) {
	b, _, _ := e.closed(2)
	const n = 16
	errs := concurrently(n, func(i int) error {
		_, err := e.s.ClaimRound(e.ctx, key(b, 1, 1), fmt.Sprintf("owner-%d", i), t0, t0.Add(time.Minute))
		return err
	})
	winner := -1
	for i, err := range errs {
		switch branchkey.ErrorCode(err) {
		case "":
			if winner >= 0 {
				t.Fatalf("owners %d and %d both claimed the round", winner, i)
			}
			winner = i
		case branchkey.ECONFLICT:
		default:
			t.Fatalf("claimer %d: %v, want nil or ECONFLICT", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no concurrent claim succeeded")
	}
	if r := e.round(key(b, 1, 1)); r.ClaimOwner != fmt.Sprintf("owner-%d", winner) {
		t.Fatalf("ClaimOwner = %q, want owner-%d", r.ClaimOwner, winner)
	}
}

func testFinishRound(t *testing.T, e *env) {
	b, ups, closed := e.closed(3)
	k := key(b, 1, 1)
	_, err := e.s.ClaimRound(e.ctx, k, "worker-1", t0, t0.Add(time.Minute))
	must(t, err, "claim")

	a := e.aggregation(k, closed.Inputs)
	m1, m2 := e.message(b, branchkey.MessageAggregationStatus), e.message(b, branchkey.MessageAggregationStatus)

	err = e.s.FinishRound(e.ctx, a, "worker-2", []*branchkey.Message{m1})
	wantCode(t, err, branchkey.ECONFLICT, "finish by a non-owner")
	if _, err := e.s.FindAggregation(e.ctx, a.ID); branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
		t.Fatalf("a refused finish recorded its aggregation: %v", err)
	}
	if msgs, _ := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0); len(msgs) != 0 {
		t.Fatalf("a refused finish stored %d messages", len(msgs))
	}

	must(t, e.s.FinishRound(e.ctx, a, "worker-1", []*branchkey.Message{m1, m2}), "finish")
	r := e.round(k)
	if r.Status != branchkey.RoundDone || r.AggregationID != a.ID {
		t.Fatalf("finished round = %+v, want done with aggregation %q", r, a.ID)
	}
	if m1.Seq <= 0 || m2.Seq <= m1.Seq {
		t.Fatalf("message seqs %d, %d: want positive and increasing", m1.Seq, m2.Seq)
	}
	msgs, err := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0)
	must(t, err, "list messages")
	sameList(t, "stored messages", ids(msgs, func(m *branchkey.Message) string { return m.ID }), []string{m1.ID, m2.ID})

	got, err := e.s.FindAggregation(e.ctx, a.ID)
	must(t, err, "find aggregation")
	checkAggregation(t, got, a)
	sameSet(t, "aggregation inputs", got.Inputs, updateIDs(ups))

	pending, err := e.s.PendingRounds(e.ctx, t0.Add(time.Hour))
	must(t, err, "pending rounds")
	if containsRound(pending, k) {
		t.Fatal("a done round is pending")
	}
	err = e.s.FinishRound(e.ctx, e.aggregation(k, closed.Inputs), "worker-1", nil)
	wantCode(t, err, branchkey.ECONFLICT, "finish a done round again")
	_, err = e.s.ClaimRound(e.ctx, k, "worker-3", t0.Add(time.Hour), t0.Add(2*time.Hour))
	wantCode(t, err, branchkey.ECONFLICT, "claim a done round")

	t.Run("Unclaimed", func(t *testing.T) {
		b, _, closed := e.closed(2)
		err := e.s.FinishRound(e.ctx, e.aggregation(key(b, 1, 1), closed.Inputs), "nobody", nil)
		wantCode(t, err, branchkey.ECONFLICT, "finish an unclaimed round")
	})
	t.Run("DuplicateAggregationID", func(t *testing.T) {
		b, _, closed := e.closed(2)
		_, err := e.s.ClaimRound(e.ctx, key(b, 1, 1), "w", t0, t0.Add(time.Minute))
		must(t, err, "claim")
		dup := e.aggregation(key(b, 1, 1), closed.Inputs)
		dup.ID = a.ID
		err = e.s.FinishRound(e.ctx, dup, "w", nil)
		wantCode(t, err, branchkey.ECONFLICT, "finish with a taken aggregation id")
		if r := e.round(key(b, 1, 1)); r.Status != branchkey.RoundClosed {
			t.Fatalf("round is %s after a refused finish, want closed", r.Status)
		}
	})
}

func checkAggregation(t *testing.T, got, want *branchkey.Aggregation) {
	t.Helper()
	if got.ID != want.ID || got.TreeID != want.TreeID || got.BranchID != want.BranchID ||
		got.Run != want.Run || got.Round != want.Round || got.NumSamples != want.NumSamples ||
		got.Strategy != want.Strategy || got.Mode != want.Mode || got.Size != want.Size ||
		got.BlobKey != want.BlobKey || got.StateKey != want.StateKey || got.Duration != want.Duration {
		t.Fatalf("aggregation = %+v, want %+v", got, want)
	}
	sameList(t, "aggregation Inputs", got.Inputs, want.Inputs)
	sameTime(t, "StartedAt", got.StartedAt, want.StartedAt)
	sameTime(t, "FinishedAt", got.FinishedAt, want.FinishedAt)
}

func testFinishRoundAfterTakeover(t *testing.T, e *env) {
	b, _, closed := e.closed(2)
	k := key(b, 1, 1)
	_, err := e.s.ClaimRound(e.ctx, k, "slow", t0, t0.Add(time.Minute))
	must(t, err, "claim")
	_, err = e.s.ClaimRound(e.ctx, k, "fast", t0.Add(2*time.Minute), t0.Add(3*time.Minute))
	must(t, err, "take over")

	err = e.s.FinishRound(e.ctx, e.aggregation(k, closed.Inputs), "slow", nil)
	wantCode(t, err, branchkey.ECONFLICT, "finish by the owner whose claim was taken over")
	err = e.s.FailRound(e.ctx, k, "slow", "too slow")
	wantCode(t, err, branchkey.ECONFLICT, "fail by the owner whose claim was taken over")
	a := e.aggregation(k, closed.Inputs)
	must(t, e.s.FinishRound(e.ctx, a, "fast", nil), "finish by the new owner")
	if r := e.round(k); r.AggregationID != a.ID {
		t.Fatalf("AggregationID = %q, want %q", r.AggregationID, a.ID)
	}
}

func testFailRound(t *testing.T, e *env) {
	b, _, _ := e.closed(2)
	k := key(b, 1, 1)
	_, err := e.s.ClaimRound(e.ctx, k, "w", t0, t0.Add(time.Minute))
	must(t, err, "claim")
	wantCode(t, e.s.FailRound(e.ctx, k, "other", "x"), branchkey.ECONFLICT, "fail by a non-owner")
	reason := "tensor 1 has shape (3,), the round expects (4,)"
	must(t, e.s.FailRound(e.ctx, k, "w", reason), "fail")
	r := e.round(k)
	if r.Status != branchkey.RoundFailed || r.Error != reason {
		t.Fatalf("failed round = %+v, want failed with the reason", r)
	}
	pending, err := e.s.PendingRounds(e.ctx, t0.Add(time.Hour))
	must(t, err, "pending rounds")
	if containsRound(pending, k) {
		t.Fatal("a failed round is pending")
	}
	wantCode(t, e.s.FailRound(e.ctx, k, "w", reason), branchkey.ECONFLICT, "fail a failed round")
	wantCode(t, e.s.FailRound(e.ctx, key(b, 1, 9), "w", reason), branchkey.ENOTFOUND, "fail a missing round")
}

func testAggregations(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l1, l2 := e.leaf(b), e.leaf(b)

	_, err := e.s.LatestAggregation(e.ctx, b.TreeID, b.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "latest aggregation of a branch with none")
	_, err = e.s.FindAggregation(e.ctx, e.id("missing"))
	wantCode(t, err, branchkey.ENOTFOUND, "find a missing aggregation")
	if as, err := e.s.ListAggregations(e.ctx, b.TreeID, b.ID); err != nil || len(as) != 0 {
		t.Fatalf("ListAggregations of a branch with none = %v, %v", as, err)
	}

	var made []string
	for round := 1; round <= 3; round++ {
		e.put(l1)
		e.put(l2)
		r, err := e.s.CloseRound(e.ctx, key(b, 1, round), "min_updates", nil)
		must(t, err, "close")
		made = append(made, e.finish(r.RoundKey, r.Inputs).ID)
	}
	// A new run continues the history.
	_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStopped, nil)
	must(t, err, "stop")
	_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStarted, nil)
	must(t, err, "start")
	e.put(l1)
	r, err := e.s.CloseRound(e.ctx, key(b, 2, 1), "min_updates", nil)
	must(t, err, "close run 2")
	made = append(made, e.finish(r.RoundKey, r.Inputs).ID)

	other := e.branch(branchkey.RunStarted)
	e.put(e.leaf(other))
	ro, err := e.s.CloseRound(e.ctx, key(other, 1, 1), "min_updates", nil)
	must(t, err, "close other")
	e.finish(ro.RoundKey, ro.Inputs)

	as, err := e.s.ListAggregations(e.ctx, b.TreeID, b.ID)
	must(t, err, "list aggregations")
	sameList(t, "aggregations oldest first", ids(as, func(a *branchkey.Aggregation) string { return a.ID }), made)
	latest, err := e.s.LatestAggregation(e.ctx, b.TreeID, b.ID)
	must(t, err, "latest aggregation")
	if latest.ID != made[len(made)-1] {
		t.Fatalf("LatestAggregation = %q, want %q", latest.ID, made[len(made)-1])
	}
}

func testSetRunStatus(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l := e.leaf(b)
	e.put(l)

	var built []branchkey.Branch
	msgFor := func(id string) func(*branchkey.Branch) *branchkey.Message {
		return func(nb *branchkey.Branch) *branchkey.Message {
			built = append(built, *nb)
			body, _ := json.Marshal(map[string]any{"run_status": nb.RunStatus, "run": nb.RunNumber})
			return &branchkey.Message{ID: id, TreeID: nb.TreeID, BranchID: nb.ID, Type: branchkey.MessageRunStatus, Body: body, CreatedAt: now()}
		}
	}

	pauseID := e.id("msg")
	got, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, msgFor(pauseID))
	must(t, err, "pause")
	if got.RunStatus != branchkey.RunPaused || got.RunNumber != 1 || got.Round != 1 {
		t.Fatalf("paused branch = %+v", got)
	}
	if len(built) != 1 || built[0].RunStatus != branchkey.RunPaused {
		t.Fatalf("msg was built from %+v, want the paused branch", built)
	}
	if e.findBranch(b).RunStatus != branchkey.RunPaused {
		t.Fatal("FindBranch does not show the pause")
	}

	got, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStarted, msgFor(e.id("msg")))
	must(t, err, "resume")
	if got.RunNumber != 1 || got.Round != 1 {
		t.Fatalf("a start after a pause moved to run %d round %d, want 1, 1", got.RunNumber, got.Round)
	}
	if r := e.round(key(b, 1, 1)); r.Status != branchkey.RoundOpen || r.Count != 1 {
		t.Fatalf("round 1 after pause and resume = %+v, want open with its update", r)
	}

	got, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStopped, msgFor(e.id("msg")))
	must(t, err, "stop")
	if got.RunStatus != branchkey.RunStopped || got.RunNumber != 1 {
		t.Fatalf("stopped branch = %+v", got)
	}
	// A stopped run never resumes, so its open round can never close: it
	// must not be offered as an open round any more.
	open, err := e.s.OpenRounds(e.ctx)
	must(t, err, "open rounds")
	if containsRound(open, key(b, 1, 1)) {
		t.Fatal("the stopped run's round is still listed as open")
	}

	startID := e.id("msg")
	got, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStarted, msgFor(startID))
	must(t, err, "start after stop")
	if got.RunStatus != branchkey.RunStarted || got.RunNumber != 2 || got.Round != 1 {
		t.Fatalf("a start after a stop gave run %d round %d (%s), want run 2 round 1", got.RunNumber, got.Round, got.RunStatus)
	}
	if last := built[len(built)-1]; last.RunNumber != 2 || last.Round != 1 {
		t.Fatalf("the start message was built from run %d round %d, want 2, 1", last.RunNumber, last.Round)
	}
	if fb := e.findBranch(b); fb.RunNumber != 2 || fb.Round != 1 {
		t.Fatalf("FindBranch after restart = run %d round %d", fb.RunNumber, fb.Round)
	}
	if r := e.round(key(b, 2, 1)); r.Status != branchkey.RoundOpen || r.Count != 0 {
		t.Fatalf("run 2 round 1 = %+v, want open and empty", r)
	}
	u, res := e.put(l)
	if u.Run != 2 || u.Round != 1 || res.Replaced != nil {
		t.Fatalf("an update after the restart went to run %d round %d (Replaced %v)", u.Run, u.Round, res.Replaced)
	}

	msgs, err := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0)
	must(t, err, "list messages")
	if len(msgs) != 4 || msgs[0].ID != pauseID || msgs[3].ID != startID {
		t.Fatalf("messages = %v, want the 4 run_status messages in order", ids(msgs, func(m *branchkey.Message) string { return m.ID }))
	}
	for i, m := range msgs {
		if m.Type != branchkey.MessageRunStatus || m.TreeID != b.TreeID || m.BranchID != b.ID {
			t.Fatalf("message %d = %+v", i, m)
		}
		if i > 0 && m.Seq <= msgs[i-1].Seq {
			t.Fatalf("message seqs not increasing: %d then %d", msgs[i-1].Seq, m.Seq)
		}
	}
	var body map[string]any
	must(t, json.Unmarshal(msgs[3].Body, &body), "decode message body")
	if body["run_status"] != "start" || body["run"] != float64(2) {
		t.Fatalf("start message body = %s", msgs[3].Body)
	}

	t.Run("NilMessage", func(t *testing.T) {
		b := e.branch(branchkey.RunStarted)
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, nil)
		must(t, err, "pause with no message")
		_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStarted, func(*branchkey.Branch) *branchkey.Message { return nil })
		must(t, err, "start with a nil message")
		if msgs, _ := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0); len(msgs) != 0 {
			t.Fatalf("%d messages stored with no message built", len(msgs))
		}
	})
	t.Run("FirstStartOfPausedBranch", func(t *testing.T) {
		b := e.branch(branchkey.RunPaused)
		got, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStarted, nil)
		must(t, err, "start")
		if got.RunNumber < 1 || got.Round != 1 {
			t.Fatalf("first start gave run %d round %d", got.RunNumber, got.Round)
		}
		u, _ := e.put(e.leaf(b))
		if u.Run != got.RunNumber || u.Round != 1 {
			t.Fatalf("update went to run %d round %d, want run %d round 1", u.Run, u.Round, got.RunNumber)
		}
	})
}

func testSetRunStatusMessageConflict(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	first := e.message(b, branchkey.MessageRunStatus)
	_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, func(*branchkey.Branch) *branchkey.Message { return first })
	must(t, err, "pause")
	dup := *first
	dup.Seq = 0
	_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunStopped, func(*branchkey.Branch) *branchkey.Message { return &dup })
	wantCode(t, err, branchkey.ECONFLICT, "set run status with a taken message id")
	if got := e.findBranch(b); got.RunStatus != branchkey.RunPaused {
		t.Fatalf("run status is %q after a refused change, want pause: the message and the change share a transaction", got.RunStatus)
	}
}

func testMessages(t *testing.T, e *env) {
	b1, b2 := e.branch(branchkey.RunStarted), e.branch(branchkey.RunStarted)
	seq0, err := e.s.LastMessageSeq(e.ctx)
	must(t, err, "last message seq")
	if seq0 != 0 {
		t.Fatalf("LastMessageSeq of an empty store = %d, want 0", seq0)
	}
	var in1 []*branchkey.Message
	var last int64
	for i := range 6 {
		b := b1
		if i%3 == 2 {
			b = b2
		}
		m := e.message(b, branchkey.MessageRunStatus)
		status := branchkey.RunPaused
		if i%2 == 1 {
			status = branchkey.RunStarted
		}
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, status, func(*branchkey.Branch) *branchkey.Message { return m })
		must(t, err, "set run status")
		if m.Seq <= last {
			t.Fatalf("message %d got seq %d after %d", i, m.Seq, last)
		}
		last = m.Seq
		if b == b1 {
			in1 = append(in1, m)
		}
	}
	got, err := e.s.LastMessageSeq(e.ctx)
	must(t, err, "last message seq")
	if got != last {
		t.Fatalf("LastMessageSeq = %d, want %d", got, last)
	}

	all, err := e.s.ListMessages(e.ctx, b1.TreeID, b1.ID, 0, 100)
	must(t, err, "list messages")
	if len(all) != len(in1) {
		t.Fatalf("listed %d messages of branch 1, want %d", len(all), len(in1))
	}
	for i, m := range all {
		w := in1[i]
		if m.ID != w.ID || m.Seq != w.Seq || m.Type != w.Type || string(m.Body) != string(w.Body) || m.TreeID != w.TreeID || m.BranchID != w.BranchID {
			t.Fatalf("message %d = %+v, want %+v", i, m, w)
		}
		sameTime(t, "message CreatedAt", m.CreatedAt, w.CreatedAt)
		if string(m.Payload()) == "" {
			t.Fatal("empty payload")
		}
	}
	page, err := e.s.ListMessages(e.ctx, b1.TreeID, b1.ID, in1[0].Seq, 2)
	must(t, err, "list a page")
	sameList(t, "page after the first", ids(page, func(m *branchkey.Message) string { return m.ID }), []string{in1[1].ID, in1[2].ID})
	rest, err := e.s.ListMessages(e.ctx, b1.TreeID, b1.ID, in1[len(in1)-1].Seq, 10)
	must(t, err, "list after the last")
	if len(rest) != 0 {
		t.Fatalf("listed %d messages after the last", len(rest))
	}
}

func testClaimOutbox(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	var ms []*branchkey.Message
	for i := range 3 {
		m := e.message(b, branchkey.MessageRunStatus)
		status := []branchkey.RunStatus{branchkey.RunPaused, branchkey.RunStarted, branchkey.RunPaused}[i]
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, status, func(*branchkey.Branch) *branchkey.Message { return m })
		must(t, err, "set run status")
		ms = append(ms, m)
	}
	msgIDs := func(ms []*branchkey.Message) []string {
		return ids(ms, func(m *branchkey.Message) string { return m.ID })
	}

	a, err := e.s.ClaimOutbox(e.ctx, "a", t0, t0.Add(time.Minute), 2)
	must(t, err, "claim for a")
	sameList(t, "a's lease, oldest first", msgIDs(a), []string{ms[0].ID, ms[1].ID})
	if string(a[0].Body) != string(ms[0].Body) || a[0].Type != ms[0].Type || a[0].Seq != ms[0].Seq {
		t.Fatalf("claimed message = %+v, want %+v", a[0], ms[0])
	}

	bl, err := e.s.ClaimOutbox(e.ctx, "b", t0.Add(time.Second), t0.Add(time.Minute), 10)
	must(t, err, "claim for b")
	sameList(t, "b's lease skips a's", msgIDs(bl), []string{ms[2].ID})

	none, err := e.s.ClaimOutbox(e.ctx, "c", t0.Add(2*time.Second), t0.Add(time.Minute), 10)
	must(t, err, "claim for c")
	if len(none) != 0 {
		t.Fatalf("c leased %v while every message was leased", msgIDs(none))
	}

	must(t, e.s.MarkPublished(e.ctx, []string{ms[0].ID, e.id("unknown")}), "mark published")
	must(t, e.s.MarkPublished(e.ctx, nil), "mark nothing published")

	// After the leases expire the unpublished ones come back, the published
	// one does not.
	after, err := e.s.ClaimOutbox(e.ctx, "c", t0.Add(2*time.Minute), t0.Add(3*time.Minute), 10)
	must(t, err, "claim after expiry")
	sameList(t, "leased after expiry", msgIDs(after), []string{ms[1].ID, ms[2].ID})

	must(t, e.s.MarkPublished(e.ctx, msgIDs(after)), "mark the rest published")
	left, err := e.s.ClaimOutbox(e.ctx, "d", t0.Add(time.Hour), t0.Add(2*time.Hour), 10)
	must(t, err, "claim when all are published")
	if len(left) != 0 {
		t.Fatalf("leased published messages %v", msgIDs(left))
	}
	// Published messages stay listable for watchers.
	listed, err := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0)
	must(t, err, "list messages")
	if len(listed) != 3 {
		t.Fatalf("listed %d messages after publishing, want 3", len(listed))
	}
}

func testClaimOutboxConcurrent(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	const total = 40
	for i := range total {
		status := branchkey.RunPaused
		if i%2 == 1 {
			status = branchkey.RunStarted
		}
		m := e.message(b, branchkey.MessageRunStatus)
		_, err := e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, status, func(*branchkey.Branch) *branchkey.Message { return m })
		must(t, err, "set run status")
	}
	const owners = 2
	var mu sync.Mutex
	seen := map[string]string{}
	errs := concurrently(owners*4, func(i int) error {
		owner := fmt.Sprintf("owner-%d", i%owners)
		ms, err := e.s.ClaimOutbox(e.ctx, owner, t0, t0.Add(time.Minute), 7)
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		for _, m := range ms {
			if prev, ok := seen[m.ID]; ok && prev != owner {
				return fmt.Errorf("message %s leased to both %s and %s", m.ID, prev, owner)
			}
			seen[m.ID] = owner
		}
		return nil
	})
	for i, err := range errs {
		must(t, err, fmt.Sprintf("claimer %d", i))
	}
	if len(seen) == 0 {
		t.Fatal("nothing was leased")
	}
}

func testDeleteLeaf(t *testing.T, e *env) {
	b := e.branch(branchkey.RunStarted)
	l, other := e.leaf(b), e.leaf(b)
	closedUp, _ := e.put(l)
	e.put(other)
	_, err := e.s.CloseRound(e.ctx, key(b, 1, 1), "min_updates", nil)
	must(t, err, "close")
	first, _ := e.put(l)
	second, _ := e.put(l) // supersedes first
	o2, _ := e.put(other)
	tok := &branchkey.Token{Hash: e.id("tok"), LeafID: l.ID, ExpiresAt: now().Add(time.Hour)}
	must(t, e.s.CreateToken(e.ctx, tok), "create token")

	blobs, err := e.s.DeleteLeaf(e.ctx, l.ID)
	must(t, err, "delete leaf")
	sameSet(t, "blob keys", blobs, []string{first.BlobKey, second.BlobKey})

	_, err = e.s.FindLeaf(e.ctx, l.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "find a deleted leaf")
	_, err = e.s.FindToken(e.ctx, tok.Hash)
	wantCode(t, err, branchkey.ENOTFOUND, "find a deleted leaf's token")
	for _, u := range []*branchkey.Update{first, second} {
		_, err = e.s.FindUpdate(e.ctx, u.ID)
		wantCode(t, err, branchkey.ENOTFOUND, "find a deleted leaf's open-round update")
	}
	if _, err := e.s.FindUpdate(e.ctx, closedUp.ID); err != nil {
		t.Fatalf("the deleted leaf's update in a closed round is gone: %v", err)
	}
	if r := e.round(key(b, 1, 1)); r.Count != 2 || len(r.Inputs) != 2 {
		t.Fatalf("closed round after the delete = %+v, want its 2 updates", r)
	}
	if r := e.round(key(b, 1, 2)); r.Count != 1 {
		t.Fatalf("open round Count = %d after the delete, want 1", r.Count)
	}
	ups, err := e.s.RoundUpdates(e.ctx, key(b, 1, 2))
	must(t, err, "round updates")
	sameList(t, "open round updates", updateIDs(ups), []string{o2.ID})

	// Its name is free again.
	must(t, e.s.CreateLeaf(e.ctx, &branchkey.Leaf{ID: e.id("leaf"), TreeID: b.TreeID, BranchID: b.ID, Name: l.Name}), "reuse the name")
}

// populated makes a branch with leaves, tokens, an aggregated round, an open
// round with updates and messages, and returns it with its leaves' ids and
// every blob key it owns.
func (e *env) populated(treeID string) (*branchkey.Branch, []string, []string) {
	e.t.Helper()
	b := e.branchIn(treeID, branchkey.RunStarted)
	l1, l2 := e.leaf(b), e.leaf(b)
	must(e.t, e.s.CreateToken(e.ctx, &branchkey.Token{Hash: e.id("tok"), LeafID: l1.ID, ExpiresAt: now().Add(time.Hour)}), "create token")
	var blobs []string
	for _, l := range []*branchkey.Leaf{l1, l2, l1} {
		u, _ := e.put(l)
		blobs = append(blobs, u.BlobKey)
	}
	r, err := e.s.CloseRound(e.ctx, key(b, 1, 1), "min_updates", nil)
	must(e.t, err, "close")
	a := e.finish(r.RoundKey, r.Inputs, e.message(b, branchkey.MessageAggregationStatus))
	blobs = append(blobs, a.BlobKey, a.StateKey)
	u, _ := e.put(l2)
	blobs = append(blobs, u.BlobKey)
	_, err = e.s.SetRunStatus(e.ctx, b.TreeID, b.ID, branchkey.RunPaused, func(nb *branchkey.Branch) *branchkey.Message {
		return e.message(nb, branchkey.MessageRunStatus)
	})
	must(e.t, err, "pause")
	return b, []string{l1.ID, l2.ID}, blobs
}

// gone checks that nothing of branch b is left.
func (e *env) gone(b *branchkey.Branch, leaves []string) {
	e.t.Helper()
	_, err := e.s.FindBranch(e.ctx, b.TreeID, b.ID)
	wantCode(e.t, err, branchkey.ENOTFOUND, "find a deleted branch")
	for _, id := range leaves {
		_, err := e.s.FindLeaf(e.ctx, id)
		wantCode(e.t, err, branchkey.ENOTFOUND, "find a deleted branch's leaf")
	}
	_, err = e.s.FindRound(e.ctx, key(b, 1, 1))
	wantCode(e.t, err, branchkey.ENOTFOUND, "find a deleted branch's round")
	_, err = e.s.LatestAggregation(e.ctx, b.TreeID, b.ID)
	wantCode(e.t, err, branchkey.ENOTFOUND, "find a deleted branch's aggregation")
	if ups, err := e.s.RoundUpdates(e.ctx, key(b, 1, 2)); err != nil || len(ups) != 0 {
		e.t.Fatalf("a deleted branch's updates: %d, %v", len(ups), err)
	}
	if ms, err := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0); err != nil || len(ms) != 0 {
		e.t.Fatalf("a deleted branch's messages: %d, %v", len(ms), err)
	}
	open, err := e.s.OpenRounds(e.ctx)
	must(e.t, err, "open rounds")
	for _, r := range open {
		if r.TreeID == b.TreeID && r.BranchID == b.ID {
			e.t.Fatalf("a deleted branch's round is open: %+v", r)
		}
	}
}

// intact checks that branch b and its leaves are still there.
func (e *env) intact(b *branchkey.Branch, leaves []string) {
	e.t.Helper()
	e.findBranch(b)
	for _, id := range leaves {
		_, err := e.s.FindLeaf(e.ctx, id)
		must(e.t, err, "find a leaf of a branch that was not deleted")
	}
	_, err := e.s.LatestAggregation(e.ctx, b.TreeID, b.ID)
	must(e.t, err, "latest aggregation of a branch that was not deleted")
	if ms, err := e.s.ListMessages(e.ctx, b.TreeID, b.ID, 0, 0); err != nil || len(ms) != 2 {
		e.t.Fatalf("messages of a branch that was not deleted: %d, %v", len(ms), err)
	}
}

func testDeleteBranch(t *testing.T, e *env) {
	tr := e.tree()
	b, leaves, blobs := e.populated(tr.ID)
	keep, keepLeaves, _ := e.populated(tr.ID)

	gotLeaves, gotBlobs, err := e.s.DeleteBranch(e.ctx, b.TreeID, b.ID)
	must(t, err, "delete branch")
	sameSet(t, "leaves", gotLeaves, leaves)
	sameSet(t, "blob keys", gotBlobs, blobs)
	e.gone(b, leaves)
	e.intact(keep, keepLeaves)
	if _, err := e.s.FindTree(e.ctx, tr.ID); err != nil {
		t.Fatalf("deleting a branch removed its tree: %v", err)
	}
	_, _, err = e.s.DeleteBranch(e.ctx, b.TreeID, b.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "delete a deleted branch")

	// The id can be used again, from run 1.
	again := &branchkey.Branch{TreeID: b.TreeID, ID: b.ID, Policy: defaultPolicy(), RunStatus: branchkey.RunStarted}
	must(t, e.s.CreateBranch(e.ctx, again), "re-create the branch")
	if r := e.round(key(b, 1, 1)); r.Status != branchkey.RoundOpen || r.Count != 0 {
		t.Fatalf("re-created branch's round 1 = %+v, want open and empty", r)
	}
}

func testDeleteTree(t *testing.T, e *env) {
	tr := e.tree()
	b1, leaves1, blobs1 := e.populated(tr.ID)
	b2, leaves2, blobs2 := e.populated(tr.ID)
	other := e.tree()
	keep, keepLeaves, _ := e.populated(other.ID)

	gotLeaves, gotBlobs, err := e.s.DeleteTree(e.ctx, tr.ID)
	must(t, err, "delete tree")
	sameSet(t, "leaves", gotLeaves, append(slices.Clone(leaves1), leaves2...))
	sameSet(t, "blob keys", gotBlobs, append(slices.Clone(blobs1), blobs2...))
	_, err = e.s.FindTree(e.ctx, tr.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "find a deleted tree")
	e.gone(b1, leaves1)
	e.gone(b2, leaves2)
	if bs, err := e.s.ListBranches(e.ctx, tr.ID); err != nil || len(bs) != 0 {
		t.Fatalf("branches of a deleted tree: %d, %v", len(bs), err)
	}
	e.intact(keep, keepLeaves)
	_, _, err = e.s.DeleteTree(e.ctx, tr.ID)
	wantCode(t, err, branchkey.ENOTFOUND, "delete a deleted tree")
}

// testTimes checks that times keep sub-second precision (to the microsecond,
// what every backend stores) and come back as the same instants whatever
// zone they were given in.
func testTimes(t *testing.T, e *env) {
	zone := time.FixedZone("UTC+5:30", 5*3600+1800)
	at := time.Date(2030, 1, 2, 3, 4, 5, 678901000, zone)
	tr := &branchkey.Tree{ID: e.id("tree"), CreatedAt: at}
	must(t, e.s.CreateTree(e.ctx, tr), "create tree")
	got, err := e.s.FindTree(e.ctx, tr.ID)
	must(t, err, "find tree")
	sameTime(t, "CreatedAt", got.CreatedAt, at)
	if got.CreatedAt.UTC() != at.UTC() {
		t.Fatalf("CreatedAt %v is not the instant %v", got.CreatedAt, at)
	}
}
