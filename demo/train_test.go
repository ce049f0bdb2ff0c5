package demo_test

import (
	"math/rand/v2"
	"testing"

	"github.com/branchkey/branchkey/demo"
)

// MustSplit returns the demo's default train/test split of the digits.
func MustSplit(tb testing.TB) (train, test []demo.Sample) {
	tb.Helper()
	return demo.SplitTrainTest(MustLoadDigits(tb), demo.DefaultTestFraction, 1)
}

func TestTrain(t *testing.T) {
	t.Parallel()
	train, test := MustSplit(t)

	t.Run("Learns", func(t *testing.T) {
		m := demo.NewModel(demo.DefaultHidden, 1)
		acc0, loss0 := demo.Evaluate(m, test)
		trainLoss := demo.Train(m, train, 10, demo.DefaultLR, demo.DefaultBatch, rand.New(rand.NewPCG(1, 0)))
		acc, loss := demo.Evaluate(m, test)
		t.Logf("test accuracy %.3f -> %.3f, loss %.3f -> %.3f; last-epoch train loss %.3f", acc0, acc, loss0, loss, trainLoss)
		if acc < 0.95 {
			t.Errorf("test accuracy after 10 epochs on all training data is %.3f, want >= 0.95", acc)
		}
		if loss >= loss0 {
			t.Errorf("test loss went from %.3f to %.3f", loss0, loss)
		}
		if trainLoss <= 0 || trainLoss > 0.5 {
			t.Errorf("last-epoch train loss %.3f, want in (0, 0.5]", trainLoss)
		}
		correct := 0
		for _, s := range test {
			if m.Predict(s.Features) == s.Label {
				correct++
			}
		}
		if got := float64(correct) / float64(len(test)); got != acc {
			t.Errorf("Predict is right on %.3f of the test set, Evaluate says %.3f", got, acc)
		}
	})

	t.Run("Deterministic", func(t *testing.T) {
		run := func(seed uint64) []demo.Tensor {
			m := demo.NewModel(demo.DefaultHidden, 1)
			demo.Train(m, train[:300], 2, demo.DefaultLR, demo.DefaultBatch, rand.New(rand.NewPCG(seed, 0)))
			return m.Tensors()
		}
		a := run(1)
		if !tensorsEqual(a, run(1)) {
			t.Error("the same seed trained different weights")
		}
		if tensorsEqual(a, run(2)) {
			t.Error("seeds 1 and 2 trained the same weights")
		}
	})

	t.Run("LeavesSamplesAlone", func(t *testing.T) {
		before := append([]demo.Sample(nil), train[:50]...)
		demo.Train(demo.NewModel(4, 1), train[:50], 1, 0.1, 7, rand.New(rand.NewPCG(1, 0)))
		for i := range before {
			if before[i] != train[i] {
				t.Fatalf("Train changed sample %d", i)
			}
		}
	})

	t.Run("NoSamples", func(t *testing.T) {
		m := demo.NewModel(4, 1)
		before := m.Tensors()
		if loss := demo.Train(m, nil, 1, 0.1, 8, rand.New(rand.NewPCG(1, 0))); loss != 0 {
			t.Errorf("loss %v on no samples, want 0", loss)
		}
		if !tensorsEqual(before, m.Tensors()) {
			t.Error("training on no samples changed the weights")
		}
		if acc, loss := demo.Evaluate(m, nil); acc != 0 || loss != 0 {
			t.Errorf("Evaluate on no samples = %v, %v, want 0, 0", acc, loss)
		}
	})
}

func BenchmarkTrainEpoch(b *testing.B) {
	train, _ := MustSplit(b)
	m := demo.NewModel(demo.DefaultHidden, 1)
	rng := rand.New(rand.NewPCG(1, 0))
	b.ReportAllocs()
	for b.Loop() {
		demo.Train(m, train, 1, demo.DefaultLR, demo.DefaultBatch, rng)
	}
	b.ReportMetric(float64(len(train)), "samples/op")
}
