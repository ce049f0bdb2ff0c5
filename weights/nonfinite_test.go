package weights_test

import (
	"encoding/binary"
	"math"
	"testing"

	"github.com/branchkey/branchkey/weights"
)

// TestNonFiniteFloat32 checks the word-at-a-time float32 scan finds the
// first NaN or Inf wherever it sits, and nothing in finite data.
func TestNonFiniteFloat32(t *testing.T) {
	for n := 0; n < 70; n++ {
		for bad := -1; bad < n; bad++ {
			for _, v := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
				b := make([]byte, 4*n)
				for i := range n {
					binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(i)*1e36-3e37))
				}
				if bad >= 0 {
					binary.LittleEndian.PutUint32(b[4*bad:], math.Float32bits(v))
				}
				if got := weights.Float32.NonFinite(b); got != bad {
					t.Fatalf("%d elements, non-finite at %d: NonFinite = %d", n, bad, got)
				}
			}
		}
	}
}

func BenchmarkNonFinite(b *testing.B) {
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		if weights.Float32.NonFinite(buf) >= 0 {
			b.Fatal("zeros are finite")
		}
	}
}
