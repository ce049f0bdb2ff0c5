package aggregate_test

import (
	"bytes"
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// fixtures is the repository's numpy-made test data.
const fixtures = "../testdata/fixtures"

// MustFileInput opens path as an Input named by its base name.
func MustFileInput(tb testing.TB, path string) aggregate.Input {
	tb.Helper()
	f, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		tb.Fatal(err)
	}
	return aggregate.Input{Name: filepath.Base(path), R: f, Size: fi.Size()}
}

// MustEncode returns the bytes of an update.
func MustEncode(tb testing.TB, u *weights.Update) []byte {
	tb.Helper()
	var b bytes.Buffer
	if err := weights.Encode(&b, u); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes()
}

// MemInput is an update held in memory as an Input.
func MemInput(tb testing.TB, name string, u *weights.Update) aggregate.Input {
	tb.Helper()
	b := MustEncode(tb, u)
	return aggregate.Input{Name: name, R: bytes.NewReader(b), Size: int64(len(b))}
}

// tensor makes a tensor of dt from values.
func tensor(dt weights.DType, shape []int, vals ...float64) weights.Tensor {
	b := make([]byte, len(vals)*dt.Size)
	dt.FromFloat64(b, vals)
	return weights.Tensor{DType: dt, Shape: shape, Data: b}
}

// f64 makes a one-dimensional float64 tensor.
func f64(vals ...float64) weights.Tensor {
	return tensor(weights.Float64, []int{len(vals)}, vals...)
}

// update makes an update of n samples.
func update(n int64, ts ...weights.Tensor) *weights.Update {
	return &weights.Update{NumSamples: n, Tensors: ts}
}

// MustAggregate runs Aggregate and decodes its output.
func MustAggregate(tb testing.TB, cfg aggregate.Config, inputs []aggregate.Input, opts ...aggregate.Option) (*weights.Update, *aggregate.Result) {
	tb.Helper()
	var out bytes.Buffer
	res, err := aggregate.Aggregate(context.Background(), cfg, inputs, &out, opts...)
	if err != nil {
		tb.Fatalf("Aggregate: %v", err)
	}
	u, err := weights.Decode(&out)
	if err != nil {
		tb.Fatalf("decode the aggregate: %v", err)
	}
	return u, res
}

// MustConfig parses a strategy and its options.
func MustConfig(tb testing.TB, strategy string, opts map[string]string) aggregate.Config {
	tb.Helper()
	c, err := aggregate.ParseConfig(strategy, opts)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// values returns tensor k of u as float64.
func values(u *weights.Update, k int) []float64 {
	t := &u.Tensors[k]
	v := make([]float64, t.Len())
	t.DType.ToFloat64(v, t.Data)
	return v
}

// ulp returns the spacing of dt's values near x.
func ulp(dt weights.DType, x float64) float64 {
	x = math.Abs(x)
	switch {
	case dt.Kind == 'f' && dt.Size == 2:
		return math.Max(math.Ldexp(1, -24), math.Ldexp(1, math.Ilogb(x)-10))
	case dt.Kind == 'E':
		return math.Ldexp(1, math.Ilogb(x)-7)
	case dt.Kind == 'f' && dt.Size == 4:
		return math.Max(math.Ldexp(1, -149), math.Ldexp(1, math.Ilogb(x)-23))
	case dt.Kind == 'f':
		return math.Max(math.Ldexp(1, -1074), math.Ldexp(1, math.Ilogb(x)-52)) * 16
	}
	return 0.5
}

// AssertClose fails unless got and want have the same tensors and values
// within one unit of rounding of each tensor's dtype.
func AssertClose(tb testing.TB, got, want *weights.Update) {
	tb.Helper()
	if got.NumSamples != want.NumSamples {
		tb.Errorf("num_samples = %d, want %d", got.NumSamples, want.NumSamples)
	}
	if s := weights.Compare(want.Tensors, got.Tensors); s != "" {
		tb.Fatalf("result %s", s)
	}
	for k := range want.Tensors {
		if g, w := got.Tensors[k].DType, want.Tensors[k].DType; g != w {
			tb.Errorf("tensor %d: dtype %s, want %s", k, g, w)
		}
		gv, wv := values(got, k), values(want, k)
		for i := range wv {
			if d := math.Abs(gv[i] - wv[i]); d > ulp(want.Tensors[k].DType, wv[i]) {
				tb.Errorf("tensor %d [%d] = %v, want %v (off by %g)", k, i, gv[i], wv[i], d)
				return
			}
		}
	}
}

func errorsAs(err error, target any) bool { return errors.As(err, target) }

func errorsIs(err, target error) bool { return errors.Is(err, target) }
