package aggregate_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// MustWriteRandomUpdates writes n float32 updates of params parameters in
// tensors tensors to dir and returns their paths.
func MustWriteRandomUpdates(tb testing.TB, dir string, n, params, tensors int, seed uint64) []string {
	tb.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	sizes := make([]int, tensors)
	for i := range sizes {
		sizes[i] = params / tensors
	}
	sizes[tensors-1] += params - params/tensors*tensors
	var paths []string
	for j := range n {
		ts := make([]weights.Tensor, tensors)
		for k, s := range sizes {
			v := make([]float64, s)
			for i := range v {
				v[i] = r.NormFloat64()
			}
			ts[k] = tensor(weights.Float32, []int{s}, v...)
		}
		p := filepath.Join(dir, fmt.Sprintf("leaf%04d.npy", j))
		if err := weights.WriteFile(p, update(int64(1+r.IntN(5000)), ts...)); err != nil {
			tb.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

// BenchmarkAggregate measures blocked aggregation of float32 updates from
// files (warm in the page cache) for several shapes and block sizes.
// BRANCHKEY_BENCH_DIR, when set, is a directory of update files to use
// instead (such as those bench/aggregate.sh makes).
func BenchmarkAggregate(b *testing.B) {
	type tc struct {
		name  string
		files func(b *testing.B) []string
	}
	var cases []tc
	if dir := os.Getenv("BRANCHKEY_BENCH_DIR"); dir != "" {
		cases = append(cases, tc{"Dir", func(b *testing.B) []string {
			p, _ := filepath.Glob(filepath.Join(dir, "*.npy"))
			return p
		}})
	} else {
		cases = append(cases,
			tc{"10x4M", func(b *testing.B) []string { return MustWriteRandomUpdates(b, b.TempDir(), 10, 4<<20, 8, 1) }},
			tc{"100x256K", func(b *testing.B) []string { return MustWriteRandomUpdates(b, b.TempDir(), 100, 256<<10, 8, 2) }},
		)
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			paths := c.files(b)
			var inputs []aggregate.Input
			var size int64
			for _, p := range paths {
				in := MustFileInput(b, p)
				inputs = append(inputs, in)
				size += in.Size
			}
			for _, strategy := range []string{"fedavg", "median"} {
				for _, block := range []int{16 << 10, 64 << 10, 256 << 10, 1 << 20} {
					if strategy == "median" && block != 64<<10 {
						continue
					}
					b.Run(fmt.Sprintf("%s/block=%dK", strategy, block>>10), func(b *testing.B) {
						cfg := MustConfig(b, strategy, nil)
						b.SetBytes(size)
						for b.Loop() {
							if _, err := aggregate.Aggregate(context.Background(), cfg, inputs, io.Discard, aggregate.WithBlockSize(block)); err != nil {
								b.Fatal(err)
							}
						}
					})
				}
			}
		})
	}
}

// BenchmarkAccumulatorAdd measures the incremental path: one 4M-parameter
// float32 update folded per Add, with the NaN check (as a Config refuses
// them by default) and without (as the server, which checked on upload).
func BenchmarkAccumulatorAdd(b *testing.B) {
	paths := MustWriteRandomUpdates(b, b.TempDir(), 1, 4<<20, 8, 3)
	in := MustFileInput(b, paths[0])
	for _, allow := range []bool{false, true} {
		b.Run(fmt.Sprintf("allow-non-finite=%v", allow), func(b *testing.B) {
			cfg := MustConfig(b, "fedavg", nil)
			cfg.AllowNonFinite = allow
			acc, err := aggregate.NewAccumulator(context.Background(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(in.Size)
			i := 0
			for b.Loop() {
				in.Name = fmt.Sprint(i)
				i++
				if err := acc.Add(context.Background(), in); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
