package aggregate

// useAVX2 is set when the CPU and the OS support AVX2, for the assembly
// kernels: four float32 converted, scaled and added per instruction, about
// four times the scalar loop's speed on the fold.
var useAVX2 = cpuHasAVX2()

// cpuHasAVX2 reports whether AVX2 can be used (CPUID and XGETBV).
func cpuHasAVX2() bool

// addScaledF32AVX2 adds w times the n little-endian float32 at src to the
// n float64 at acc, rounding the product and the sum separately as the
// scalar loop does (no fused multiply-add), so both give the same bits.
//
//go:noescape
func addScaledF32AVX2(acc *float64, src *byte, n int, w float64)

// scaleToF32AVX2 writes the n float64 at acc times r as little-endian
// float32 at dst and reports whether all of them are finite.
//
//go:noescape
func scaleToF32AVX2(dst *byte, acc *float64, n int, r float64) bool
