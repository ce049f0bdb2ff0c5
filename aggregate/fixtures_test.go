package aggregate_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// TestFedAvgFixtures checks both paths against numpy's weighted mean of every
// fixture round (float32, float64 and float16 models).
func TestFedAvgFixtures(t *testing.T) {
	rounds, _ := filepath.Glob(filepath.Join(fixtures, "round_*", "fedavg.npy"))
	if len(rounds) == 0 {
		t.Fatal("no fixture rounds")
	}
	for _, ref := range rounds {
		dir := filepath.Dir(ref)
		t.Run(filepath.Base(dir), func(t *testing.T) {
			want, err := weights.ReadFile(ref)
			if err != nil {
				t.Fatal(err)
			}
			leaves, _ := filepath.Glob(filepath.Join(dir, "leaf*.npy"))
			var inputs []aggregate.Input
			for _, p := range leaves {
				inputs = append(inputs, MustFileInput(t, p))
			}
			cfg := MustConfig(t, "fedavg", nil)
			t.Run("Blocked", func(t *testing.T) {
				got, res := MustAggregate(t, cfg, inputs)
				AssertClose(t, got, want)
				if len(res.Updates) != len(leaves) || res.NumSamples != want.NumSamples {
					t.Errorf("result %+v", res)
				}
			})
			t.Run("Incremental", func(t *testing.T) {
				acc, err := aggregate.NewAccumulator(context.Background(), cfg)
				if err != nil {
					t.Fatal(err)
				}
				for _, in := range inputs {
					if err := acc.Add(context.Background(), in); err != nil {
						t.Fatal(err)
					}
				}
				var out bytes.Buffer
				if _, err := acc.WriteAggregate(context.Background(), &out); err != nil {
					t.Fatal(err)
				}
				got, err := weights.Decode(&out)
				if err != nil {
					t.Fatal(err)
				}
				AssertClose(t, got, want)
			})
		})
	}
}
