package aggregate

import (
	"encoding/binary"
	"math"
	"unsafe"

	"github.com/branchkey/branchkey/weights"
)

// The loops below are the engine's hot path. Little-endian float32 and
// float64, what nearly every model holds, are read in place as []float32
// and []float64 on little-endian hosts: measured, that is three times
// faster than decoding each element with encoding/binary, since the
// compiler then emits one conversion per element and no bounds checks.
// Everything else goes through weights.DType.ToFloat64.

// nativeLE reports whether the host is little-endian.
var nativeLE = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// asF32 views b's first 4n bytes as n float32 (host order). x86 and arm64
// load unaligned floats; the views are never kept past the buffer.
func asF32(b []byte, n int) []float32 {
	b = b[:4*n]
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

// asF64 views b's first 8n bytes as n float64 (host order).
func asF64(b []byte, n int) []float64 {
	b = b[:8*n]
	if n == 0 {
		return nil
	}
	return unsafe.Slice((*float64)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

// addScaled adds w times the elements of src, of type dt, to acc. tmp is
// scratch of at least len(acc) for the generic case.
func addScaled(acc []float64, src []byte, dt weights.DType, w float64, tmp []float64) {
	n := len(acc)
	switch {
	case nativeLE && dt == weights.Float32:
		if useAVX2 && n > 0 {
			src = src[:4*n]
			addScaledF32AVX2(&acc[0], &src[0], n, w)
			return
		}
		f := asF32(src, n)
		for i := range acc {
			acc[i] += w * float64(f[i])
		}
	case nativeLE && dt == weights.Float64:
		f := asF64(src, n)
		for i := range acc {
			acc[i] += w * f[i]
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
	n := len(dst)
	switch {
	case nativeLE && dt == weights.Float32:
		f := asF32(src, n)
		for i := range dst {
			dst[i] = float64(f[i])
		}
	case nativeLE && dt == weights.Float64:
		copy(dst, asF64(src, n))
	default:
		dt.ToFloat64(dst, src)
	}
}

// divideToF32 writes acc[i]/div as little-endian float32 into dst and
// reports whether all results are finite. It multiplies by the reciprocal,
// a fifth of the cost of dividing; the float64 quotient can be off by an
// ulp, which changes the float32 result only when it lies that close to a
// float32 rounding boundary (about once in 2^28).
func divideToF32(dst []byte, acc []float64, div float64) bool {
	r := 1 / div
	if useAVX2 && len(acc) > 0 {
		dst = dst[:4*len(acc)]
		return scaleToF32AVX2(&dst[0], &acc[0], len(acc), r)
	}
	bad := false
	if nativeLE {
		f := asF32(dst, len(acc))
		for i, v := range acc {
			x := float32(v * r)
			bad = bad || x-x != 0
			f[i] = x
		}
		return !bad
	}
	dst = dst[:4*len(acc)]
	for i, v := range acc {
		x := float32(v * r)
		bad = bad || x-x != 0
		binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(x))
	}
	return !bad
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

// allFinite reports whether v holds no NaN or Inf, with four independent
// sums so that it runs at load speed.
func allFinite(v []float64) bool {
	var s0, s1, s2, s3 float64
	for len(v) >= 4 {
		s0 += v[0] - v[0]
		s1 += v[1] - v[1]
		s2 += v[2] - v[2]
		s3 += v[3] - v[3]
		v = v[4:]
	}
	for _, x := range v {
		s0 += x - x
	}
	return s0+s1+s2+s3 == 0
}
