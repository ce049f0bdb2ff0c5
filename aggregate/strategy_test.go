package aggregate_test

import (
	"bytes"
	"context"
	"math"
	"slices"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// small returns updates of two float64 tensors and an int64 counter, small
// enough to check by hand.
func small(tb testing.TB, ups ...*weights.Update) []aggregate.Input {
	tb.Helper()
	var ins []aggregate.Input
	for i, u := range ups {
		ins = append(ins, MemInput(tb, string(rune('a'+i))+".npy", u))
	}
	return ins
}

func assertValues(tb testing.TB, u *weights.Update, k int, want ...float64) {
	tb.Helper()
	got := values(u, k)
	if len(got) != len(want) {
		tb.Fatalf("tensor %d has %d values, want %d", k, len(got), len(want))
	}
	for i := range want {
		if math.Abs(got[i]-want[i]) > 1e-12*math.Max(1, math.Abs(want[i])) {
			tb.Fatalf("tensor %d = %v, want %v", k, got, want)
		}
	}
}

// TestStrategies checks every strategy against a case computed by hand.
func TestStrategies(t *testing.T) {
	// Five updates of one parameter pair, n = 1, 1, 2, 1, 5.
	five := func(tb testing.TB) []aggregate.Input {
		return small(tb,
			update(1, f64(0, 10)),
			update(1, f64(1, 11)),
			update(2, f64(2, 12)),
			update(1, f64(3, 13)),
			update(5, f64(100, -50)),
		)
	}
	for _, tc := range []struct {
		name     string
		strategy string
		opts     map[string]string
		want     []float64
		samples  int64
		selected []string
	}{
		// (0*1 + 1*1 + 2*2 + 3*1 + 100*5) / 10 = 50.8; (10+11+24+13-250)/10 = -19.2
		{"FedAvg", "fedavg", nil, []float64{50.8, -19.2}, 10, nil},
		// (0+1+2+3+100)/5, (10+11+12+13-50)/5
		{"FedAvgUnweighted", "fedavg-unweighted", nil, []float64{106.0 / 5, -4.0 / 5}, 10, nil},
		{"Median", "median", nil, []float64{2, 11}, 10, nil},
		// trim 0.2 of 5: one cut at each end: mean(1, 2, 3), mean(10, 11, 12)
		{"TrimmedMean", "trimmed-mean", map[string]string{"trim": "0.2"}, []float64{2, 11}, 10, nil},
		{"TrimmedMeanZero", "trimmed-mean", map[string]string{"trim": "0"}, []float64{106.0 / 5, -4.0 / 5}, 10, nil},
		// Krum, F=1, N-F-2 = 2 neighbours; squared distances between the
		// honest ones are 2*(i-j)^2: scores a: 2+8=10, b: 2+2=4, c: 4,
		// d: 2+8=10; e is far. b and c tie; the first by name wins.
		{"Krum", "krum", map[string]string{"byzantine": "1"}, []float64{1, 11}, 1, []string{"b.npy"}},
		// Multi-Krum keeps M=3: b, c and then a (ties with d, a first),
		// averaged by num_samples 1, 1, 2: (0+1+4)/4, (10+11+24)/4.
		{"MultiKrum", "multi-krum", map[string]string{"byzantine": "1", "select": "3"}, []float64{1.25, 11.25}, 4, []string{"a.npy", "b.npy", "c.npy"}},
		// Default M = N-F = 4: a, b, c, d: (0+1+4+3)/5, (10+11+24+13)/5.
		{"MultiKrumDefault", "multi-krum", nil, []float64{8.0 / 5, 58.0 / 5}, 5, []string{"a.npy", "b.npy", "c.npy", "d.npy"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := MustConfig(t, tc.strategy, tc.opts)
			u, res := MustAggregate(t, cfg, five(t))
			assertValues(t, u, 0, tc.want...)
			if u.NumSamples != tc.samples || res.NumSamples != tc.samples {
				t.Errorf("num_samples = %d (result %d), want %d", u.NumSamples, res.NumSamples, tc.samples)
			}
			if !slices.Equal(res.Selected, tc.selected) {
				t.Errorf("selected %v, want %v", res.Selected, tc.selected)
			}
			if len(res.Updates) != 5 {
				t.Errorf("updates %v", res.Updates)
			}
		})
	}

	t.Run("KrumTooFew", func(t *testing.T) {
		cfg := MustConfig(t, "krum", map[string]string{"byzantine": "2"})
		_, err := aggregate.Aggregate(context.Background(), cfg, five(t), &bytes.Buffer{})
		var ce *aggregate.ConfigError
		if !errorsAs(err, &ce) || ce.Option != "byzantine" {
			t.Fatalf("err = %v, want a ConfigError about --byzantine", err)
		}
	})
	t.Run("MedianEven", func(t *testing.T) {
		u, _ := MustAggregate(t, MustConfig(t, "median", nil), small(t,
			update(1, f64(1)), update(1, f64(5)), update(1, f64(2)), update(1, f64(100))))
		assertValues(t, u, 0, 3.5)
	})
}

// TestIntegerTensors checks that integer tensors are averaged and rounded
// to the nearest integer, never truncated, in every strategy family.
func TestIntegerTensors(t *testing.T) {
	counter := func(v int64) weights.Tensor {
		return tensor(weights.Int64, nil, float64(v))
	}
	// Weighted: (3*10 + 1*13) / 4 = 10.75 -> 11 (truncation would give 10).
	ins := func(tb testing.TB) []aggregate.Input {
		return small(tb, update(3, f64(1), counter(10)), update(1, f64(2), counter(13)))
	}
	for _, tc := range []struct {
		name, strategy string
		opts           map[string]string
		want           float64
	}{
		{"FedAvg", "fedavg", nil, 11},
		{"Unweighted", "fedavg-unweighted", nil, 12}, // 11.5 rounds to even
		{"Median", "median", nil, 12},
		{"FedAdam", "fedadam", nil, 11},
		{"DP", "dp-fedavg", map[string]string{"clip": "1", "noise-multiplier": "1"}, 11},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := MustConfig(t, tc.strategy, tc.opts)
			var opts []aggregate.Option
			if cfg.NeedsGlobal() {
				opts = append(opts, aggregate.WithGlobal(MemInput(t, "global.npy", update(1, f64(0), counter(0)))))
			}
			u, _ := MustAggregate(t, cfg, ins(t), opts...)
			if u.Tensors[1].DType != weights.Int64 {
				t.Fatalf("counter dtype %s", u.Tensors[1].DType)
			}
			assertValues(t, u, 1, tc.want)
		})
	}
}

// TestServerOptimizers checks fedavgm, fedadam, fedyogi and fedadagrad over
// two rounds by hand, the state carried in between, on both paths.
func TestServerOptimizers(t *testing.T) {
	ctx := context.Background()
	// Round 1: global x = 0, updates 1 (n=1) and 3 (n=1): mean y = 2, d = 2.
	// Round 2: global x = r1, updates mean y = r1 + 1: d = 1.
	for _, tc := range []struct {
		name     string
		strategy string
		opts     map[string]string
		step     func(d, m, v float64) (float64, float64, float64) // returns step, m, v
	}{
		{"FedAvgM", "fedavgm", map[string]string{"server-lr": "0.5", "momentum": "0.9"}, func(d, m, v float64) (float64, float64, float64) {
			m = 0.9*m + d
			return 0.5 * m, m, v
		}},
		{"FedAdam", "fedadam", map[string]string{"server-lr": "0.1", "beta1": "0.9", "beta2": "0.99", "tau": "0.001"}, func(d, m, v float64) (float64, float64, float64) {
			m = 0.9*m + 0.1*d
			v = 0.99*v + 0.01*d*d
			return 0.1 * m / (math.Sqrt(v) + 0.001), m, v
		}},
		{"FedYogi", "fedyogi", nil, func(d, m, v float64) (float64, float64, float64) {
			m = 0.9*m + 0.1*d
			s := math.Copysign(1, v-d*d)
			if v == d*d {
				s = 0
			}
			v = v - 0.01*d*d*s
			return 0.01 * m / (math.Sqrt(v) + 0.001), m, v
		}},
		{"FedAdagrad", "fedadagrad", nil, func(d, _, v float64) (float64, float64, float64) {
			v += d * d // beta1 = 0: m is d
			return 0.1 * d / (math.Sqrt(v) + 1e-9), d, v
		}},
	} {
		for _, incremental := range []bool{false, true} {
			name := tc.name + "/Blocked"
			if incremental {
				name = tc.name + "/Incremental"
			}
			t.Run(name, func(t *testing.T) {
				cfg := MustConfig(t, tc.strategy, tc.opts)
				run := func(global float64, ups []float64, state []byte) (float64, []byte, *aggregate.Result) {
					var ins []aggregate.Input
					for i, v := range ups {
						ins = append(ins, MemInput(t, string(rune('a'+i)), update(1, f64(v))))
					}
					var stOut, out bytes.Buffer
					opts := []aggregate.Option{aggregate.WithGlobal(MemInput(t, "g", update(1, f64(global)))), aggregate.WithStateOut(&stOut)}
					if state != nil {
						opts = append(opts, aggregate.WithState(aggregate.Input{Name: "state", R: bytes.NewReader(state), Size: int64(len(state))}))
					}
					var res *aggregate.Result
					var err error
					if incremental {
						var acc *aggregate.Accumulator
						acc, err = aggregate.NewAccumulator(ctx, cfg, opts...)
						for _, in := range ins {
							if err == nil {
								err = acc.Add(ctx, in)
							}
						}
						if err == nil {
							res, err = acc.WriteAggregate(ctx, &out)
						}
					} else {
						res, err = aggregate.Aggregate(ctx, cfg, ins, &out, opts...)
					}
					if err != nil {
						t.Fatal(err)
					}
					u, err := weights.Decode(&out)
					if err != nil {
						t.Fatal(err)
					}
					return values(u, 0)[0], stOut.Bytes(), res
				}
				step1, m, v := tc.step(2, 0, 0)
				r1, st1, res1 := run(0, []float64{1, 3}, nil)
				if math.Abs(r1-step1) > 1e-12 {
					t.Fatalf("round 1 = %v, want %v", r1, step1)
				}
				if res1.StateRound != 1 {
					t.Errorf("round 1 state round %d", res1.StateRound)
				}
				stU, err := weights.Decode(bytes.NewReader(st1))
				if err != nil {
					t.Fatal(err)
				}
				if stU.NumSamples != 1 || stU.Tensors[0].DType != weights.Float64 {
					t.Fatalf("state: num_samples %d, dtype %s", stU.NumSamples, stU.Tensors[0].DType)
				}
				stv := values(stU, 0)
				if math.Abs(stv[0]-m) > 1e-12 || (len(stv) > 1 && math.Abs(stv[1]-v) > 1e-12) {
					t.Fatalf("state %v, want m=%v v=%v", stv, m, v)
				}
				step2, _, _ := tc.step(1, m, v)
				r2, st2, res2 := run(r1, []float64{r1 + 0.5, r1 + 1.5}, st1)
				if want := r1 + step2; math.Abs(r2-want) > 1e-12 {
					t.Fatalf("round 2 = %v, want %v", r2, want)
				}
				if res2.StateRound != 2 || len(st2) == 0 {
					t.Errorf("round 2 state round %d", res2.StateRound)
				}
			})
		}
	}

	t.Run("ErrNoGlobal", func(t *testing.T) {
		_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedadam", nil), small(t, update(1, f64(1))), &bytes.Buffer{})
		var ce *aggregate.ConfigError
		if !errorsAs(err, &ce) {
			t.Fatalf("err = %v, want ConfigError", err)
		}
	})
	t.Run("ErrStateShape", func(t *testing.T) {
		bad := MustEncode(t, update(1, f64(0, 0, 0)))
		_, err := aggregate.Aggregate(ctx, MustConfig(t, "fedadam", nil), small(t, update(1, f64(1))), &bytes.Buffer{},
			aggregate.WithGlobal(MemInput(t, "g", update(1, f64(0)))),
			aggregate.WithState(aggregate.Input{Name: "st", R: bytes.NewReader(bad), Size: int64(len(bad))}))
		if !errorsIs(err, aggregate.ErrMismatch) {
			t.Fatalf("err = %v, want ErrMismatch", err)
		}
		t.Log(err)
	})
}

// TestDPFedAvg checks clipping by hand and the noise's scale statistically.
func TestDPFedAvg(t *testing.T) {
	ctx := context.Background()
	t.Run("Clip", func(t *testing.T) {
		// global (1, 1); deltas (3, 4) (norm 5, clipped to (0.6, 0.8))
		// and (0.3, 0.4) (norm 0.5, kept): mean delta (0.45, 0.6).
		cfg := MustConfig(t, "dp-fedavg", map[string]string{"clip": "1", "noise-multiplier": "0"})
		ins := small(t, update(7, f64(4, 5)), update(1, f64(1.3, 1.4)))
		g := aggregate.WithGlobal(MemInput(t, "g", update(1, f64(1, 1))))
		u, res := MustAggregate(t, cfg, ins, g)
		assertValues(t, u, 0, 1.45, 1.6)
		if res.NumSamples != 8 {
			t.Errorf("num_samples %d", res.NumSamples)
		}
		acc, err := aggregate.NewAccumulator(ctx, cfg, g)
		if err != nil {
			t.Fatal(err)
		}
		for _, in := range ins {
			if err := acc.Add(ctx, in); err != nil {
				t.Fatal(err)
			}
		}
		var out bytes.Buffer
		if _, err := acc.WriteAggregate(ctx, &out); err != nil {
			t.Fatal(err)
		}
		ui, _ := weights.Decode(&out)
		assertValues(t, ui, 0, 1.45, 1.6)
	})
	t.Run("NoiseScale", func(t *testing.T) {
		// Updates equal to the global model: the result is the global
		// model plus noise of standard deviation Z*C/K = 1.5*2/4 = 0.75.
		const n = 200_000
		zero := make([]float64, n)
		ins := small(t, update(1, f64(zero...)), update(2, f64(zero...)), update(3, f64(zero...)), update(4, f64(zero...)))
		cfg := MustConfig(t, "dp-fedavg", map[string]string{"clip": "2", "noise-multiplier": "1.5", "seed": "42"})
		g := aggregate.WithGlobal(MemInput(t, "g", update(1, f64(zero...))))
		u, _ := MustAggregate(t, cfg, ins, g)
		v := values(u, 0)
		var s, s2 float64
		for _, x := range v {
			s += x
			s2 += x * x
		}
		mean := s / n
		sd := math.Sqrt(s2/n - mean*mean)
		// The sample sd of 200k normals is within 0.5% of the truth with
		// overwhelming probability; the mean within 0.75*5/sqrt(n).
		if math.Abs(sd-0.75) > 0.75*0.005 || math.Abs(mean) > 0.75*5/math.Sqrt(n) {
			t.Fatalf("noise mean %v sd %v, want 0 and 0.75", mean, sd)
		}
		// The same seed gives the same noise whatever the blocks and
		// workers; another seed does not.
		u2, _ := MustAggregate(t, cfg, ins, g, aggregate.WithWorkers(1), aggregate.WithBlockSize(4096))
		if !bytes.Equal(u.Tensors[0].Data, u2.Tensors[0].Data) {
			t.Fatal("noise depends on block size or workers")
		}
		cfg.Seed = 43
		u3, _ := MustAggregate(t, cfg, ins, g)
		if bytes.Equal(u.Tensors[0].Data, u3.Tensors[0].Data) {
			t.Fatal("noise does not depend on the seed")
		}
	})
}

// TestOutlier plants one wild update among honest ones: the robust
// strategies keep it out, fedavg does not.
func TestOutlier(t *testing.T) {
	const n = 5000
	var ups []*weights.Update
	for i := range 8 {
		v := make([]float64, n)
		for j := range v {
			v[j] = 1 + 0.01*float64((i*7+j*13)%11-5)
		}
		ups = append(ups, update(100, tensor(weights.Float32, []int{n}, v...)))
	}
	wild := make([]float64, n)
	for j := range wild {
		wild[j] = 1e6 * float64(j%3-1)
	}
	ups = append(ups, update(1000, tensor(weights.Float32, []int{n}, wild...)))
	ins := small(t, ups...)
	for _, tc := range []struct {
		strategy string
		opts     map[string]string
		robust   bool
	}{
		{"fedavg", nil, false},
		{"median", nil, true},
		{"trimmed-mean", map[string]string{"trim": "0.2"}, true},
		{"krum", map[string]string{"byzantine": "2"}, true},
		{"multi-krum", map[string]string{"byzantine": "2"}, true},
	} {
		t.Run(tc.strategy, func(t *testing.T) {
			u, res := MustAggregate(t, MustConfig(t, tc.strategy, tc.opts), ins, aggregate.WithBlockSize(4096))
			worst := 0.0
			for _, x := range values(u, 0) {
				worst = math.Max(worst, math.Abs(x-1))
			}
			if tc.robust && worst > 0.06 {
				t.Fatalf("the outlier moved the result by %v", worst)
			}
			if !tc.robust && worst < 1000 {
				t.Fatalf("fedavg should follow the outlier; moved by %v", worst)
			}
			if slices.Contains(res.Selected, "i.npy") {
				t.Fatalf("selected the outlier: %v", res.Selected)
			}
		})
	}
}
