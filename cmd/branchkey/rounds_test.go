package main

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/weights"
)

// loginAll logs in the leaves of a branch created by MustBranch.
func loginAll(tb testing.TB, m *Main, tree, branch string, created []testLeaf) []*wireLeaf {
	tb.Helper()
	ls := make([]*wireLeaf, len(created))
	for i, c := range created {
		ls[i] = &wireLeaf{server: m.URL(), name: c.Name, password: c.Password, tree: tree, branch: branch}
		if err := ls[i].login(); err != nil {
			tb.Fatal(err)
		}
	}
	return ls
}

func mustUpload(tb testing.TB, l *wireLeaf, file []byte) string {
	tb.Helper()
	id, status, err := l.upload(file, uniqueName("key"))
	if err != nil {
		tb.Fatalf("upload: %d %v", status, err)
	}
	return id
}

// TestRoundPolicies checks the branch policies end to end: max_wait with
// min_quorum, sample_size, re-uploads replacing a leaf's update, and a
// strategy that runs blocked from storage.
func TestRoundPolicies(t *testing.T) {
	m := MustServer(t, nil)
	a := MustAdmin(t, m.URL())
	ctx := context.Background()

	t.Run("MaxWaitQuorum", func(t *testing.T) {
		tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(5), MaxWait: "1s", MinQuorum: 2}, 3)
		ls := loginAll(t, m, tree, branch, created)
		file, _ := float32Update(t, 3, 100, 1)
		start := time.Now()
		mustUpload(t, ls[0], file)
		time.Sleep(1500 * time.Millisecond)
		if aggs, _ := a.ListAggregations(ctx, tree, branch); len(aggs) != 0 {
			t.Fatal("aggregated below the quorum")
		}
		mustUpload(t, ls[1], file)
		agg := waitAggregation(t, a, tree, branch, 1)
		if len(agg.Inputs) != 2 || time.Since(start) < time.Second {
			t.Fatalf("max_wait round aggregated %d inputs after %s", len(agg.Inputs), time.Since(start))
		}
		b, _ := a.ShowBranch(ctx, tree, branch)
		if b.Round != 2 {
			t.Fatalf("next round is %d", b.Round)
		}
	})

	t.Run("SampleSize", func(t *testing.T) {
		tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(4), SampleSize: 2}, 4)
		ls := loginAll(t, m, tree, branch, created)
		uploaded := map[string]bool{}
		for i, l := range ls {
			file, _ := float32Update(t, int64(i+1), 100, uint64(i))
			uploaded[mustUpload(t, l, file)] = true
		}
		agg := waitAggregation(t, a, tree, branch, 1)
		if len(agg.Inputs) != 2 || agg.Inputs[0] == agg.Inputs[1] || !uploaded[agg.Inputs[0]] || !uploaded[agg.Inputs[1]] {
			t.Fatalf("sampled inputs %v of %v", agg.Inputs, uploaded)
		}
	})

	t.Run("ReuploadReplaces", func(t *testing.T) {
		tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(2)}, 2)
		ls := loginAll(t, m, tree, branch, created)
		first, _ := float32Update(t, 1, 100, 1)
		second, vals := float32Update(t, 1, 100, 2)
		mustUpload(t, ls[0], first)
		keep := mustUpload(t, ls[0], second)
		b, _ := a.ShowBranch(ctx, tree, branch)
		if b.CurrentRound.Count != 1 {
			t.Fatalf("a re-upload counted twice: %d", b.CurrentRound.Count)
		}
		other := mustUpload(t, ls[1], second)
		agg := waitAggregation(t, a, tree, branch, 1)
		if len(agg.Inputs) != 2 || !(agg.Inputs[0] == keep || agg.Inputs[1] == keep) || !(agg.Inputs[0] == other || agg.Inputs[1] == other) {
			t.Fatalf("inputs %v, want the re-upload %s and %s", agg.Inputs, keep, other)
		}
		got, _, _ := ls[0].download(agg.ID)
		u, err := weights.Decode(bytes.NewReader(got))
		if err != nil {
			t.Fatal(err)
		}
		tn := u.Tensors[0]
		vs := make([]float64, tn.Len())
		tn.DType.ToFloat64(vs, tn.Data)
		if float32(vs[3]) != vals[3] { // both inputs are `second`
			t.Fatalf("aggregate %v, want the re-uploaded values %v", vs[3], vals[3])
		}
	})

	t.Run("BlockedStrategy", func(t *testing.T) {
		tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3), Strategy: "median"}, 3)
		ls := loginAll(t, m, tree, branch, created)
		for i, l := range ls {
			file, _ := float32Update(t, int64(i+1), 100, uint64(i))
			mustUpload(t, l, file)
		}
		waitAggregation(t, a, tree, branch, 1)
		aggs, _ := a.ListAggregations(ctx, tree, branch)
		if aggs[0].Mode != "blocked" || aggs[0].Strategy != "median" {
			t.Fatalf("median round: mode %s strategy %s", aggs[0].Mode, aggs[0].Strategy)
		}
	})

	t.Run("ServerOptimizer", func(t *testing.T) {
		tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(2), Strategy: "fedadam"}, 2)
		ls := loginAll(t, m, tree, branch, created)
		for round := 1; round <= 3; round++ {
			for i, l := range ls {
				file, _ := float32Update(t, int64(i+1), 100, uint64(round*7+i))
				mustUpload(t, l, file)
			}
			waitAggregation(t, a, tree, branch, round)
		}
		aggs, _ := a.ListAggregations(ctx, tree, branch)
		if len(aggs) != 3 || aggs[0].Strategy != "fedadam" {
			t.Fatalf("aggregations %+v", aggs)
		}
	})
}
