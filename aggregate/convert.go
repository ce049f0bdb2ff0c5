package aggregate

import (
	"encoding/binary"
	"math"

	"github.com/branchkey/branchkey/weights"
)

// The loops below are the engine's hot path. Little-endian float32 and
// float64, what nearly every model holds, get loops of their own that the
// compiler turns into plain loads without bounds checks; everything else
// goes through weights.DType.ToFloat64.

// addScaled adds w times the elements of src, of type dt, to acc. tmp is
// scratch of at least len(acc) for the generic case.
func addScaled(acc []float64, src []byte, dt weights.DType, w float64, tmp []float64) {
	n := len(acc)
	switch {
	case dt == weights.Float32:
		src = src[:4*n]
		for i := 0; i+4 <= n; i += 4 {
			b := src[4*i : 4*i+16]
			a := acc[i : i+4]
			a[0] += w * float64(math.Float32frombits(binary.LittleEndian.Uint32(b[0:])))
			a[1] += w * float64(math.Float32frombits(binary.LittleEndian.Uint32(b[4:])))
			a[2] += w * float64(math.Float32frombits(binary.LittleEndian.Uint32(b[8:])))
			a[3] += w * float64(math.Float32frombits(binary.LittleEndian.Uint32(b[12:])))
		}
		for i := n &^ 3; i < n; i++ {
			acc[i] += w * float64(math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])))
		}
	case dt == weights.Float64:
		src = src[:8*n]
		for i := range acc {
			acc[i] += w * math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:]))
		}
	default:
		tmp = tmp[:n]
		dt.ToFloat64(tmp, src)
		for i, v := range tmp {
			acc[i] += w * v
		}
	}
}

// load converts the elements of src, of type dt, into dst.
func load(dst []float64, src []byte, dt weights.DType) {
	if dt == weights.Float32 {
		n := len(dst)
		src = src[:4*n]
		for i := range dst {
			dst[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])))
		}
		return
	}
	dt.ToFloat64(dst, src)
}

// firstNonFinite returns the index of the first NaN or Inf in v, or -1.
func firstNonFinite(v []float64) int {
	for i, x := range v {
		if x-x != 0 { // NaN - NaN and Inf - Inf are NaN; finite - itself is 0
			return i
		}
	}
	return -1
}

// allFinite reports whether v holds no NaN or Inf, faster than
// firstNonFinite when they are rare.
func allFinite(v []float64) bool {
	s := 0.0
	for _, x := range v {
		s += x - x
	}
	return s == 0
}
