package demo_test

import (
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/demo"
)

// counts returns how many times each sample occurs in sets.
func counts(sets ...[]demo.Sample) map[demo.Sample]int {
	m := make(map[demo.Sample]int)
	for _, set := range sets {
		for _, s := range set {
			m[s]++
		}
	}
	return m
}

func classSizes(samples []demo.Sample) [demo.NumClasses]int {
	var n [demo.NumClasses]int
	for _, s := range samples {
		n[s.Label]++
	}
	return n
}

func TestSplitTrainTest(t *testing.T) {
	all := MustLoadDigits(t)
	train, test := demo.SplitTrainTest(all, 0.2, 1)

	t.Run("Stratified", func(t *testing.T) {
		whole, held := classSizes(all), classSizes(test)
		for c := range whole {
			if want := int(math.Round(0.2 * float64(whole[c]))); held[c] != want {
				t.Errorf("test set has %d of class %d, want %d (20%% of %d)", held[c], c, want, whole[c])
			}
		}
	})
	t.Run("Partitions", func(t *testing.T) {
		if len(train)+len(test) != len(all) {
			t.Fatalf("%d train + %d test samples, want %d", len(train), len(test), len(all))
		}
		if !mapsEqual(counts(train, test), counts(all)) {
			t.Error("train and test together are not the input samples")
		}
	})
	t.Run("Deterministic", func(t *testing.T) {
		train2, test2 := demo.SplitTrainTest(all, 0.2, 1)
		if !slices.Equal(train, train2) || !slices.Equal(test, test2) {
			t.Error("the same seed gave a different split")
		}
		_, test3 := demo.SplitTrainTest(all, 0.2, 2)
		if slices.Equal(test, test3) {
			t.Error("seeds 1 and 2 gave the same test set")
		}
	})
	t.Run("PanicsOnBadFraction", func(t *testing.T) {
		for _, f := range []float64{0, 1, -0.1, math.NaN()} {
			func() {
				defer func() {
					if recover() == nil {
						t.Errorf("fraction %v did not panic", f)
					}
				}()
				demo.SplitTrainTest(all, f, 1)
			}()
		}
	})
}

func mapsEqual(a, b map[demo.Sample]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestPartition(t *testing.T) {
	all := MustLoadDigits(t)
	train, _ := demo.SplitTrainTest(all, demo.DefaultTestFraction, 1)

	for _, n := range []int{1, 2, 3, 4, 8, 16, 33, 64} {
		leaves, err := demo.Partition(train, n, demo.DefaultAlpha, 7)
		if err != nil {
			t.Fatalf("n=%d: %v", n, err)
		}
		if len(leaves) != n {
			t.Fatalf("n=%d: got %d leaves", n, len(leaves))
		}
		if !mapsEqual(counts(leaves...), counts(train)) {
			t.Errorf("n=%d: the leaves together are not the training set", n)
		}
		floor := min(demo.MinLeafSamples, len(train)/n)
		for k, leaf := range leaves {
			if len(leaf) < floor {
				t.Errorf("n=%d: leaf %d has %d samples, want at least %d", n, k, len(leaf), floor)
			}
		}
	}

	t.Run("Deterministic", func(t *testing.T) {
		a, _ := demo.Partition(train, 4, demo.DefaultAlpha, 7)
		b, _ := demo.Partition(train, 4, demo.DefaultAlpha, 7)
		c, _ := demo.Partition(train, 4, demo.DefaultAlpha, 8)
		if !slices.EqualFunc(a, b, slices.Equal) {
			t.Error("the same seed gave a different partition")
		}
		if slices.EqualFunc(a, c, slices.Equal) {
			t.Error("seeds 7 and 8 gave the same partition")
		}
	})

	// Over many seeds, not one lucky draw: four leaves should differ in size
	// and in the digits they see.
	t.Run("NonIID", func(t *testing.T) {
		var sizeRatio, topShare float64
		const seeds = 20
		for seed := range uint64(seeds) {
			leaves, err := demo.Partition(train, 4, demo.DefaultAlpha, seed)
			if err != nil {
				t.Fatal(err)
			}
			small, large := len(train), 0
			for _, leaf := range leaves {
				small, large = min(small, len(leaf)), max(large, len(leaf))
				// Share of the leaf taken by its two most common digits; 0.2
				// for an even mix.
				sizes := classSizes(leaf)
				slices.Sort(sizes[:])
				topShare += float64(sizes[9]+sizes[8]) / float64(len(leaf)) / (4 * seeds)
			}
			sizeRatio += float64(large) / float64(small) / seeds
		}
		t.Logf("mean largest/smallest leaf %.1f, mean share of a leaf's top two digits %.2f", sizeRatio, topShare)
		if sizeRatio < 3 {
			t.Errorf("mean largest/smallest leaf size is %.1f, want >= 3", sizeRatio)
		}
		if topShare < 0.4 {
			t.Errorf("a leaf's two most common digits make up %.2f of it on average, want >= 0.4", topShare)
		}
	})

	errs := []struct {
		name    string
		samples []demo.Sample
		n       int
		alpha   float64
		want    string
	}{
		{"ErrNoLeaves", train, 0, 0.5, "over 0 leaves"},
		{"ErrTooManyLeaves", train[:3], 4, 0.5, "3 samples over 4 leaves"},
		{"ErrZeroAlpha", train, 4, 0, "alpha 0"},
		{"ErrNaNAlpha", train, 4, math.NaN(), "alpha NaN"},
		{"ErrInfAlpha", train, 4, math.Inf(1), "alpha +Inf"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			_, err := demo.Partition(tt.samples, tt.n, tt.alpha, 1)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got error %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}
