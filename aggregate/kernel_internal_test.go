package aggregate

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/branchkey/branchkey/weights"
)

// TestKernels pins the fast paths (assembly where the CPU has it) to the
// generic conversions, bit for bit, at every length around the unrolling.
func TestKernels(t *testing.T) {
	t.Run("Fast", testKernels)
	if useAVX2 {
		useAVX2 = false
		defer func() { useAVX2 = true }()
		t.Run("Scalar", testKernels)
	}
}

func testKernels(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := range 70 {
		src := make([]float64, n)
		for i := range src {
			src[i] = r.NormFloat64() * math.Ldexp(1, r.IntN(40)-20)
		}
		if n > 3 {
			src[3] = math.Float64frombits(1) // a float32 subnormal after rounding: 0
		}
		raw := make([]byte, 4*n)
		weights.Float32.FromFloat64(raw, src)
		x := make([]float64, n)
		weights.Float32.ToFloat64(x, raw)
		t.Run(fmt.Sprintf("addScaled/%d", n), func(t *testing.T) {
			acc := make([]float64, n)
			want := make([]float64, n)
			for i := range acc {
				acc[i] = float64(i) / 3
				want[i] = acc[i] + 1234*x[i]
			}
			addScaled(acc, raw, weights.Float32, 1234, nil)
			for i := range acc {
				if math.Float64bits(acc[i]) != math.Float64bits(want[i]) {
					t.Fatalf("[%d] = %v, want %v", i, acc[i], want[i])
				}
			}
		})
		t.Run(fmt.Sprintf("divideToF32/%d", n), func(t *testing.T) {
			out := make([]byte, 4*n)
			if !divideToF32(out, src, 7) {
				t.Fatal("finite values reported non-finite")
			}
			got := make([]float64, n)
			weights.Float32.ToFloat64(got, out)
			for i := range got {
				if want := float64(float32(src[i] * (1.0 / 7))); got[i] != want {
					t.Fatalf("[%d] = %v, want %v", i, got[i], want)
				}
			}
			if n > 0 {
				src[n-1] = math.Inf(1)
				if divideToF32(out, src, 7) {
					t.Fatal("Inf not reported")
				}
				src[n-1] = math.NaN()
				if divideToF32(out, src, 7) {
					t.Fatal("NaN not reported")
				}
				src[n-1] = 1e300 // finite in float64, Inf in float32
				if divideToF32(out, src, 7) {
					t.Fatal("float32 overflow not reported")
				}
			}
		})
	}
}

// BenchmarkKernels measures the fold's inner loops on cache-resident data.
func BenchmarkKernels(b *testing.B) {
	for _, n := range []int{16 << 10, 64 << 10} {
		acc := make([]float64, n)
		src := make([][]byte, 4)
		for i := range src {
			src[i] = make([]byte, 4*n)
		}
		b.Run(fmt.Sprintf("addScaled/%dK", n>>10), func(b *testing.B) {
			b.SetBytes(int64(16 * n))
			for b.Loop() {
				for i := range 4 {
					addScaled(acc, src[i], weights.Float32, 2, nil)
				}
			}
		})
		b.Run(fmt.Sprintf("divideToF32/%dK", n>>10), func(b *testing.B) {
			b.SetBytes(int64(8 * n))
			for b.Loop() {
				divideToF32(src[0], acc, 3)
			}
		})
	}
}

// TestSortNetwork checks that the network sorts every 0-1 sequence up to
// 16 inputs (which proves it sorts anything, by the 0-1 principle) and
// random values up to 130, infinities and signed zeros included.
func TestSortNetwork(t *testing.T) {
	apply := func(net [][2]int, v []float64) {
		for _, ce := range net {
			a, b := v[ce[0]], v[ce[1]]
			v[ce[0]], v[ce[1]] = min(a, b), max(a, b)
		}
	}
	for n := range 17 {
		net := sortNetwork(n)
		v := make([]float64, n)
		for bits := range 1 << n {
			for i := range v {
				v[i] = float64(bits >> i & 1)
			}
			apply(net, v)
			if !slices.IsSorted(v) {
				t.Fatalf("n=%d: %b not sorted: %v", n, bits, v)
			}
		}
	}
	r := rand.New(rand.NewPCG(5, 6))
	special := []float64{math.Inf(1), math.Inf(-1), 0, math.Copysign(0, -1)}
	for n := range 131 {
		net := sortNetwork(n)
		for range 20 {
			v := make([]float64, n)
			for i := range v {
				v[i] = float64(r.IntN(9)) - 4
				if r.IntN(5) == 0 {
					v[i] = special[r.IntN(len(special))]
				}
			}
			want := slices.Clone(v)
			slices.Sort(want)
			apply(net, v)
			for i := range v {
				if v[i] != want[i] {
					t.Fatalf("n=%d: sorted %v, want %v", n, v, want)
				}
			}
		}
	}
}
