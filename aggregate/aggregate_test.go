package aggregate_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// TestMismatch checks that disagreeing updates fail with a typed error that
// names the update, the tensor and both sides.
func TestMismatch(t *testing.T) {
	ctx := context.Background()
	round0, _ := filepath.Glob(filepath.Join(fixtures, "round_0", "leaf*.npy"))
	for _, tc := range []struct {
		name   string
		inputs func(tb testing.TB) []aggregate.Input
		want   []string
	}{
		{"ErrShape", func(tb testing.TB) []aggregate.Input {
			var ins []aggregate.Input
			for _, p := range round0 {
				ins = append(ins, MustFileInput(tb, p))
			}
			// Named to sort last, so a round_0 leaf is the first update.
			in := MustFileInput(tb, filepath.Join(fixtures, "round_0_mismatch.npy"))
			return append(ins, in)
		}, []string{"update round_0_mismatch.npy: tensor 0 has shape (6, 5), the first update's is (6, 4)"}},
		{"ErrDTypeKind", func(tb testing.TB) []aggregate.Input {
			return small(tb, update(1, f64(1), f64(2)), update(1, f64(1), tensor(weights.Int32, []int{1}, 2)))
		}, []string{"update b.npy: tensor 1 has dtype int32, the first update's is float64"}},
		{"ErrTensorCount", func(tb testing.TB) []aggregate.Input {
			return small(tb, update(1, f64(1), f64(2)), update(1, f64(1)))
		}, []string{"update b.npy: has 1 tensors, the first update's has 2"}},
		{"ErrOrder", func(tb testing.TB) []aggregate.Input {
			c := tensor(weights.Float32, []int{2, 3}, 1, 2, 3, 4, 5, 6)
			f := c
			f.Fortran = true
			return small(tb, update(1, c), update(1, f))
		}, []string{"update b.npy: tensor 0 is stored in Fortran order, the first update's in C order"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check := func(err error) {
				t.Helper()
				var ie *aggregate.InputError
				if !errors.Is(err, aggregate.ErrMismatch) || !errors.As(err, &ie) {
					t.Fatalf("err = %v, want an ErrMismatch InputError", err)
				}
				for _, w := range tc.want {
					if !strings.Contains(err.Error(), w) {
						t.Fatalf("err = %q, want it to say %q", err, w)
					}
				}
			}
			_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedavg", nil), tc.inputs(t), &bytes.Buffer{})
			check(err)
			acc, _ := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", nil))
			for _, in := range tc.inputs(t) {
				if err = acc.Add(ctx, in); err != nil {
					break
				}
			}
			check(err)
		})
	}
	t.Run("GlobalReference", func(t *testing.T) {
		_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedavgm", nil), small(t, update(1, f64(1, 2))), &bytes.Buffer{},
			aggregate.WithGlobal(MemInput(t, "g.npy", update(1, f64(1, 2, 3)))))
		if !errors.Is(err, aggregate.ErrMismatch) || !strings.Contains(err.Error(), "update a.npy: tensor 0 has shape (2,), the global model's is (3,)") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("ErrMalformed", func(t *testing.T) {
		ins := small(t, update(1, f64(1)))
		ins = append(ins, MustFileInput(t, filepath.Join(fixtures, "bad_truncated.npy")))
		_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedavg", nil), ins, &bytes.Buffer{})
		if !errors.Is(err, aggregate.ErrMalformed) || !errors.Is(err, weights.ErrTruncated) || !strings.HasPrefix(err.Error(), "update bad_truncated.npy: ") {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("ErrDuplicate", func(t *testing.T) {
		ins := small(t, update(1, f64(1)), update(1, f64(2)))
		ins[1].Name = ins[0].Name
		_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedavg", nil), ins, &bytes.Buffer{})
		if !errors.Is(err, aggregate.ErrDuplicate) || err.Error() != "update a.npy: is given twice" {
			t.Fatalf("err = %v", err)
		}
	})
	t.Run("FortranBoth", func(t *testing.T) {
		// Updates that agree on Fortran order average element by element
		// and the result keeps the order.
		a := tensor(weights.Float32, []int{2, 3}, 1, 2, 3, 4, 5, 6)
		b := tensor(weights.Float32, []int{2, 3}, 3, 4, 5, 6, 7, 8)
		a.Fortran, b.Fortran = true, true
		u, _ := MustAggregate(t, MustConfig(t, "fedavg", nil), small(t, update(1, a), update(1, b)))
		if !u.Tensors[0].Fortran {
			t.Fatal("lost Fortran order")
		}
		assertValues(t, u, 0, 2, 3, 4, 5, 6, 7)
	})
}

// TestNonFinite checks that NaN and Inf are refused by default, naming the
// update, tensor and index, and averaged through when allowed.
func TestNonFinite(t *testing.T) {
	ctx := context.Background()
	for _, dt := range []weights.DType{weights.Float32, weights.Float64, weights.Float16, {Kind: 'f', Size: 4, BigEndian: true}} {
		for _, bad := range []float64{math.NaN(), math.Inf(-1)} {
			t.Run(fmt.Sprintf("%s/%v", dt, bad), func(t *testing.T) {
				vals := make([]float64, 10000)
				vals[7777] = bad
				ins := small(t,
					update(1, tensor(dt, []int{3}, 1, 2, 3), tensor(dt, []int{10000}, make([]float64, 10000)...)),
					update(1, tensor(dt, []int{3}, 1, 2, 3), tensor(dt, []int{10000}, vals...)))
				want := fmt.Sprintf("update b.npy: tensor 1 holds %v at flat index 7777", bad)
				for _, strategy := range []string{"fedavg", "median"} {
					_, err := aggregate.Aggregate(ctx, MustConfig(t, strategy, nil), ins, &bytes.Buffer{}, aggregate.WithBlockSize(4096))
					if !errors.Is(err, aggregate.ErrNonFinite) || !strings.Contains(err.Error(), want) {
						t.Fatalf("%s: err = %v, want %q", strategy, err, want)
					}
				}
				acc, _ := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", nil))
				if err := acc.Add(ctx, ins[0]); err != nil {
					t.Fatal(err)
				}
				if err := acc.Add(ctx, ins[1]); !errors.Is(err, aggregate.ErrNonFinite) || !strings.Contains(err.Error(), want) {
					t.Fatalf("Add: err = %v, want %q", err, want)
				}
				cfg := MustConfig(t, "fedavg", map[string]string{"allow-non-finite": "true"})
				u, _ := MustAggregate(t, cfg, ins)
				if v := values(u, 1)[7777]; !math.IsNaN(v) && !math.IsInf(v, 0) {
					t.Fatalf("allowed: got %v", v)
				}
			})
		}
	}
}

// TestOrderIndependence checks that the result does not depend on the
// order of the inputs, for every blocked strategy.
func TestOrderIndependence(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	var ups []*weights.Update
	for range 7 {
		v := make([]float64, 3000)
		for i := range v {
			v[i] = r.NormFloat64()
		}
		ups = append(ups, update(int64(1+r.IntN(100)), tensor(weights.Float64, []int{1000}, v[:1000]...), tensor(weights.Float32, []int{20, 100}, v[1000:]...)))
	}
	for _, strategy := range []string{"fedavg", "fedavg-unweighted", "median", "trimmed-mean", "krum", "multi-krum"} {
		t.Run(strategy, func(t *testing.T) {
			ins := small(t, ups...)
			var first []byte
			for i := range 4 {
				r.Shuffle(len(ins), func(a, b int) { ins[a], ins[b] = ins[b], ins[a] })
				var out bytes.Buffer
				if _, err := aggregate.Aggregate(context.Background(), MustConfig(t, strategy, nil), ins, &out); err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					first = out.Bytes()
				} else if !bytes.Equal(first, out.Bytes()) {
					t.Fatal("the result depends on the inputs' order")
				}
			}
		})
	}
}

// TestPaths checks that both paths, any block size and worker count give
// the same bytes, for every dtype a model can hold.
func TestPaths(t *testing.T) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(3, 4))
	dts := []weights.DType{weights.Float32, weights.Float64, weights.Float16, weights.BFloat16,
		{Kind: 'f', Size: 4, BigEndian: true}, {Kind: 'f', Size: 8, BigEndian: true}, weights.Int64, weights.Uint8}
	var ups []*weights.Update
	for range 5 {
		var ts []weights.Tensor
		for k, dt := range dts {
			n := []int{9000, 5, 1, 0, 4097, 300, 1, 17}[k]
			v := make([]float64, n)
			for i := range v {
				v[i] = r.NormFloat64() * 10
				if !dt.IsFloat() {
					v[i] = math.Abs(math.Round(v[i] * 10))
				}
			}
			ts = append(ts, tensor(dt, []int{n}, v...))
		}
		ups = append(ups, update(int64(1+r.IntN(9)), ts...))
	}
	for _, strategy := range []string{"fedavg", "fedavg-unweighted", "fedavgm", "fedadam", "dp-fedavg"} {
		t.Run(strategy, func(t *testing.T) {
			opts := map[string]string{}
			if strategy == "dp-fedavg" {
				opts = map[string]string{"clip": "50", "noise-multiplier": "0.1", "seed": "9"}
			}
			cfg := MustConfig(t, strategy, opts)
			ins := small(t, ups...)
			g := aggregate.WithGlobal(ins[0])
			var want []byte
			for _, o := range [][]aggregate.Option{
				{g},
				{g, aggregate.WithBlockSize(4096), aggregate.WithWorkers(1)},
				{g, aggregate.WithBlockSize(8192), aggregate.WithWorkers(3)},
			} {
				var out bytes.Buffer
				if _, err := aggregate.Aggregate(ctx, cfg, ins, &out, o...); err != nil {
					t.Fatal(err)
				}
				if want == nil {
					want = out.Bytes()
				} else if !bytes.Equal(out.Bytes(), want) {
					t.Fatal("blocked results differ with block size or workers")
				}
			}
			acc, err := aggregate.NewAccumulator(ctx, cfg, g, aggregate.WithBlockSize(4096))
			if err != nil {
				t.Fatal(err)
			}
			for _, in := range ins {
				if err := acc.Add(ctx, in); err != nil {
					t.Fatal(err)
				}
			}
			var out bytes.Buffer
			res, err := acc.WriteAggregate(ctx, &out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), want) {
				t.Fatal("incremental and blocked results differ")
			}
			if res.Mode != "incremental" || len(res.Updates) != 5 {
				t.Fatalf("result %+v", res)
			}
		})
	}
}

// TestAccumulator checks the incremental path's bookkeeping.
func TestAccumulator(t *testing.T) {
	ctx := context.Background()
	t.Run("RefusedLeavesSum", func(t *testing.T) {
		acc, err := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", nil))
		if err != nil {
			t.Fatal(err)
		}
		nan := small(t, update(1, f64(1, 2)), update(5, f64(3, math.NaN())), update(1, f64(3, 4)), update(1, f64(1, 2, 3)))
		for i, in := range nan {
			err := acc.Add(ctx, in)
			if (i == 1 || i == 3) != (err != nil) {
				t.Fatalf("Add(%s) = %v", in.Name, err)
			}
		}
		if err := acc.Add(ctx, nan[0]); !errors.Is(err, aggregate.ErrDuplicate) {
			t.Fatalf("duplicate: %v", err)
		}
		if got := acc.Inputs(); !slices.Equal(got, []string{"a.npy", "c.npy"}) || acc.Len() != 2 || acc.NumSamples() != 2 {
			t.Fatalf("inputs %v, samples %d", got, acc.NumSamples())
		}
		for range 2 { // WriteAggregate can be repeated
			var out bytes.Buffer
			res, err := acc.WriteAggregate(ctx, &out)
			if err != nil {
				t.Fatal(err)
			}
			u, _ := weights.Decode(&out)
			assertValues(t, u, 0, 2, 3)
			if res.NumSamples != 2 || !slices.Equal(res.Updates, []string{"a.npy", "c.npy"}) {
				t.Fatalf("result %+v", res)
			}
		}
	})
	t.Run("FirstRefused", func(t *testing.T) {
		acc, _ := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", nil))
		ins := small(t, update(1, f64(math.Inf(1))), update(1, f64(1, 2)))
		if err := acc.Add(ctx, ins[0]); err == nil {
			t.Fatal("Inf accepted")
		}
		if err := acc.Add(ctx, ins[1]); err != nil {
			t.Fatalf("a refused first update fixed the shapes: %v", err)
		}
	})
	t.Run("ErrNeedsAll", func(t *testing.T) {
		for _, s := range []string{"median", "trimmed-mean", "krum", "multi-krum"} {
			cfg := MustConfig(t, s, nil)
			if _, err := aggregate.NewAccumulator(ctx, cfg); err == nil || !cfg.NeedsAll() {
				t.Fatalf("%s: NewAccumulator did not refuse", s)
			}
		}
	})
	t.Run("ErrEmpty", func(t *testing.T) {
		acc, _ := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", nil))
		if _, err := acc.WriteAggregate(ctx, &bytes.Buffer{}); err == nil {
			t.Fatal("wrote an aggregate of nothing")
		}
	})
	t.Run("ErrBroken", func(t *testing.T) {
		acc, _ := aggregate.NewAccumulator(ctx, MustConfig(t, "fedavg", map[string]string{"allow-non-finite": "true"}))
		b := MustEncode(t, update(1, f64(make([]float64, 100)...)))
		u, err := weights.Index(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		in := aggregate.Input{Name: "flaky", R: failingReader{}, Size: int64(len(b)), Update: u}
		if err := acc.Add(ctx, in); !errors.Is(err, aggregate.ErrBroken) {
			t.Fatalf("err = %v, want ErrBroken", err)
		}
		if err := acc.Add(ctx, MemInput(t, "ok", update(1, f64(make([]float64, 100)...)))); !errors.Is(err, aggregate.ErrBroken) {
			t.Fatalf("err = %v, want ErrBroken", err)
		}
	})
}

type failingReader struct{}

func (failingReader) ReadAt(p []byte, off int64) (int, error) { return 0, errors.New("disk on fire") }

// TestCancel checks that a cancelled context stops an aggregation.
func TestCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedavg", nil), small(t, update(1, f64(1))), &bytes.Buffer{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}

// TestParseConfig checks options, defaults and error messages.
func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name     string
		strategy string
		opts     map[string]string
		err      string
	}{
		{"OKDefault", "", nil, ""},
		{"OKTrim", "trimmed-mean", map[string]string{"trim": "0.25"}, ""},
		{"OKSeedEverywhere", "median", map[string]string{"seed": "3", "allow-non-finite": "true"}, ""},
		{"OKAdam", "fedadam", map[string]string{"server-lr": "0.01", "beta1": "0.8", "beta2": "0.9", "tau": "1e-3"}, ""},
		{"ErrTrimRange", "trimmed-mean", map[string]string{"trim": "0.7"}, "trimmed-mean: --trim must be in [0, 0.5), got 0.7"},
		{"ErrTrimParse", "trimmed-mean", map[string]string{"trim": "much"}, `trimmed-mean: --trim: cannot parse "much"`},
		{"ErrUnknownStrategy", "fedprox", nil, `unknown strategy "fedprox"`},
		{"ErrForeignOption", "fedavg", map[string]string{"trim": "0.1"}, "fedavg: unknown option --trim; fedavg takes no options"},
		{"ErrByzantine", "krum", map[string]string{"byzantine": "-1"}, "krum: --byzantine must be at least 0, got -1"},
		{"ErrClipMissing", "dp-fedavg", map[string]string{"noise-multiplier": "1"}, "dp-fedavg: --clip is required"},
		{"ErrClip", "dp-fedavg", map[string]string{"clip": "0", "noise-multiplier": "1"}, "dp-fedavg: --clip must be positive, got 0"},
		{"ErrBeta", "fedyogi", map[string]string{"beta2": "1"}, "fedyogi: --beta2 must be in [0, 1), got 1"},
		{"ErrNaN", "fedavgm", map[string]string{"momentum": "NaN"}, `fedavgm: --momentum: cannot parse "NaN"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := aggregate.ParseConfig(tc.strategy, tc.opts)
			if tc.err == "" {
				if err != nil {
					t.Fatal(err)
				}
				back, err := aggregate.ParseConfig(string(c.Strategy), c.Options())
				if err != nil || back != c {
					t.Fatalf("Options round trip: %+v, %v; want %+v", back, err, c)
				}
				return
			}
			var ce *aggregate.ConfigError
			if !errors.As(err, &ce) || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
		})
	}
	t.Run("Defaults", func(t *testing.T) {
		c := MustConfig(t, "fedadam", nil)
		if c.ServerLR != 0.1 || c.Beta1 != 0.9 || c.Beta2 != 0.99 || c.Tau != 1e-9 || !c.NeedsGlobal() || !c.KeepsState() || c.NeedsAll() {
			t.Fatalf("%+v", c)
		}
		for _, s := range aggregate.Strategies() {
			if s.Doc == "" {
				t.Errorf("%s has no doc", s.Name)
			}
			if _, err := aggregate.ParseConfig(string(s.Name), map[string]string{"clip": "1", "noise-multiplier": "1"}); err != nil && s.Name == aggregate.DPFedAvg {
				t.Errorf("%s: %v", s.Name, err)
			}
		}
	})
}

// TestSample checks that Sample picks k distinct indices, the same for a
// seed, uniformly.
func TestSample(t *testing.T) {
	t.Run("Deterministic", func(t *testing.T) {
		a, b := aggregate.Sample(100, 10, 5), aggregate.Sample(100, 10, 5)
		if !slices.Equal(a, b) || len(a) != 10 || !slices.IsSorted(a) || len(slices.Compact(slices.Clone(a))) != 10 {
			t.Fatalf("%v %v", a, b)
		}
		if slices.Equal(a, aggregate.Sample(100, 10, 6)) {
			t.Fatal("seed ignored")
		}
		// Pinned: the same on every machine and Go release.
		if got := aggregate.Sample(10, 3, 1); !slices.Equal(got, pinnedSample) {
			t.Fatalf("Sample(10, 3, 1) = %v, was %v", got, pinnedSample)
		}
	})
	t.Run("All", func(t *testing.T) {
		for _, k := range []int{0, -1, 5, 9} {
			if got := aggregate.Sample(5, k, 1); !slices.Equal(got, []int{0, 1, 2, 3, 4}) {
				t.Fatalf("k=%d: %v", k, got)
			}
		}
	})
	t.Run("Uniform", func(t *testing.T) {
		// 20000 draws of 3 of 10: each index expected 6000 times; a
		// chi-square over 9 degrees of freedom above 40 has p < 1e-5.
		counts := make([]float64, 10)
		for s := range 20000 {
			for _, i := range aggregate.Sample(10, 3, int64(s)) {
				counts[i]++
			}
		}
		chi := 0.0
		for _, c := range counts {
			chi += (c - 6000) * (c - 6000) / 6000
		}
		if chi > 40 {
			t.Fatalf("counts %v, chi-square %v", counts, chi)
		}
	})
}

var pinnedSample = []int{5, 7, 9}
