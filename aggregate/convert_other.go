//go:build !amd64

package aggregate

var useAVX2 = false

func addScaledF32AVX2(acc *float64, src *byte, n int, w float64) {
	panic("aggregate: no AVX2 kernel on this architecture")
}

func scaleToF32AVX2(dst *byte, acc *float64, n int, r float64) bool {
	panic("aggregate: no AVX2 kernel on this architecture")
}
