package demo_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/branchkey/branchkey/demo"
)

// fedAvg returns the mean of the leaves' parameters with leaf k weighted by
// weights[k], accumulated in float64: what the server's aggregation computes.
func fedAvg(leaves [][]demo.Tensor, weights []float64) ([]demo.Tensor, error) {
	var total float64
	for _, w := range weights {
		total += w
	}
	out := make([]demo.Tensor, len(leaves[0]))
	for i := range out {
		sum := make([]float64, len(leaves[0][i].Data))
		for k, ts := range leaves {
			if len(ts[i].Data) != len(sum) {
				return nil, fmt.Errorf("leaf %d tensor %d has %d values, leaf 0 has %d", k, i, len(ts[i].Data), len(sum))
			}
			for j, v := range ts[i].Data {
				sum[j] += weights[k] * float64(v)
			}
		}
		data := make([]float32, len(sum))
		for j, s := range sum {
			data[j] = float32(s / total)
		}
		out[i] = demo.Tensor{Shape: leaves[0][i].Shape, Data: data}
	}
	return out, nil
}

// round is the global model's test metrics after one round.
type round struct{ acc, loss float64 }

func (r round) String() string { return fmt.Sprintf("%.3f (loss %.3f)", r.acc, r.loss) }

// simulate runs rounds of federated averaging the way `branchkey demo` does,
// minus the server: every round each leaf loads the global model, trains
// locally with the demo's settings, and the global model becomes the average
// of the leaf models, weighted by each leaf's sample count or, if weighted is
// false, equally. Each leaf keeps one random source for all rounds. It does
// not touch a testing.TB so that tests can run simulations concurrently.
func simulate(leaves [][]demo.Sample, test []demo.Sample, rounds int, seed uint64, weighted bool) ([]round, error) {
	rngs := make([]*rand.Rand, len(leaves))
	weights := make([]float64, len(leaves))
	for k, leaf := range leaves {
		rngs[k] = rand.New(rand.NewPCG(seed, uint64(k)))
		weights[k] = 1
		if weighted {
			weights[k] = float64(len(leaf))
		}
	}
	global := demo.NewModel(demo.DefaultHidden, seed).Tensors()
	var results []round
	for range rounds {
		updates := make([][]demo.Tensor, len(leaves))
		for k, leaf := range leaves {
			m, err := demo.ModelFromTensors(global)
			if err != nil {
				return nil, err
			}
			demo.Train(m, leaf, demo.DefaultEpochs, demo.DefaultLR, demo.DefaultBatch, rngs[k])
			updates[k] = m.Tensors()
		}
		var err error
		if global, err = fedAvg(updates, weights); err != nil {
			return nil, err
		}
		m, err := demo.ModelFromTensors(global)
		if err != nil {
			return nil, err
		}
		acc, loss := demo.Evaluate(m, test)
		results = append(results, round{acc, loss})
	}
	return results, nil
}

// MustLeaves splits the digits with seed and partitions the training part
// over n leaves with the demo's settings.
func MustLeaves(tb testing.TB, n int, seed uint64) (leaves [][]demo.Sample, test []demo.Sample) {
	tb.Helper()
	train, test := demo.SplitTrainTest(MustLoadDigits(tb), demo.DefaultTestFraction, seed)
	leaves, err := demo.Partition(train, n, demo.DefaultAlpha, seed)
	if err != nil {
		tb.Fatal(err)
	}
	return leaves, test
}

func logLeaves(tb testing.TB, leaves [][]demo.Sample) {
	tb.Helper()
	for k, leaf := range leaves {
		tb.Logf("leaf %d: %4d samples, per digit %v", k, len(leaf), classSizes(leaf))
	}
}

// MustSimulate is simulate for a test's own goroutine.
func MustSimulate(tb testing.TB, leaves [][]demo.Sample, test []demo.Sample, rounds int, seed uint64, weighted bool) []round {
	tb.Helper()
	results, err := simulate(leaves, test, rounds, seed, weighted)
	if err != nil {
		tb.Fatal(err)
	}
	return results
}

// The simulations are the slowest tests under -race, so they run in parallel
// with each other and with the rest of the package.
func TestFederatedAveraging(t *testing.T) {
	t.Parallel()
	const seed = 1

	t.Run("FourLeavesFiveRounds", func(t *testing.T) {
		t.Parallel()
		leaves, test := MustLeaves(t, 4, seed)
		logLeaves(t, leaves)
		var weighted, unweighted []round
		var errW, errU error
		var wg sync.WaitGroup
		wg.Go(func() { weighted, errW = simulate(leaves, test, 5, seed, true) })
		wg.Go(func() { unweighted, errU = simulate(leaves, test, 5, seed, false) })
		wg.Wait()
		if err := errors.Join(errW, errU); err != nil {
			t.Fatal(err)
		}
		for r := range weighted {
			t.Logf("round %d: weighted %v, unweighted %v", r+1, weighted[r], unweighted[r])
		}

		first, last := weighted[0], weighted[len(weighted)-1]
		if last.acc <= first.acc {
			t.Errorf("test accuracy went from %.3f in round 1 to %.3f in round 5, want a rise", first.acc, last.acc)
		}
		if last.acc < 0.90 {
			t.Errorf("test accuracy after 5 rounds is %.3f, want >= 0.90", last.acc)
		}

		// On this split the leaves differ several-fold in size, so giving the
		// small, skewed leaves an equal vote drags the global model toward
		// their few digits. Over 50 seeds the gap after round 1 averages 17
		// points of accuracy and shrinks as rounds go on.
		if gap := weighted[0].acc - unweighted[0].acc; gap < 0.05 {
			t.Errorf("round 1 accuracy weighted %.3f, unweighted %.3f: gap %.3f, want >= 0.05", weighted[0].acc, unweighted[0].acc, gap)
		}
		if u := unweighted[len(unweighted)-1]; last.loss >= u.loss {
			t.Errorf("test loss after 5 rounds weighted %.3f, unweighted %.3f, want weighted lower", last.loss, u.loss)
		}
	})

	t.Run("ThreeLeavesThreeRounds", func(t *testing.T) {
		t.Parallel()
		leaves, test := MustLeaves(t, 3, seed)
		logLeaves(t, leaves)
		results := MustSimulate(t, leaves, test, 3, seed, true)
		for r, res := range results {
			t.Logf("round %d: %v", r+1, res)
		}
		if last := results[len(results)-1]; last.acc < 0.85 {
			t.Errorf("test accuracy after 3 rounds is %.3f, want >= 0.85", last.acc)
		}
	})
}

// BenchmarkRound times one federated round with four leaves: four local
// trainings and the average, without evaluation.
func BenchmarkRound(b *testing.B) {
	leaves, _ := MustLeaves(b, 4, 1)
	for b.Loop() {
		MustSimulate(b, leaves, nil, 1, 1, true)
	}
}
