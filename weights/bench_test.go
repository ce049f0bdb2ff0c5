package weights_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey/weights"
)

// benchFile returns the update to benchmark: $BRANCHKEY_BENCH_FILE (bench/decode.sh
// passes a 400 MB numpy-made file), or a 40 MB float32 update written here.
func benchFile(b *testing.B) string {
	b.Helper()
	if p := os.Getenv("BRANCHKEY_BENCH_FILE"); p != "" {
		return p
	}
	path := filepath.Join(b.TempDir(), "update.npy")
	u := &weights.Update{NumSamples: 100}
	for _, n := range []int{4_000_000, 1_000_000, 4_000_000, 1_000_000} {
		u.Tensors = append(u.Tensors, weights.Tensor{DType: weights.Float32, Shape: []int{n / 1000, 1000}, Data: make([]byte, 4*n)})
	}
	if err := weights.WriteFile(path, u); err != nil {
		b.Fatal(err)
	}
	return path
}

func BenchmarkIndex(b *testing.B) {
	path := benchFile(b)
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(fi.Size())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := weights.IndexFile(path); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecode(b *testing.B) {
	path := benchFile(b)
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(fi.Size())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := weights.ReadFile(path); err != nil {
			b.Fatal(err)
		}
	}
}
