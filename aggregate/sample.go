package aggregate

import (
	"math/bits"
	"math/rand/v2"
	"slices"
)

// Sample returns k distinct indices in [0, n), chosen uniformly without
// replacement, in increasing order. The choice depends only on n, k and
// seed: the generator (PCG) and the algorithm (a partial Fisher-Yates
// shuffle) are fixed here, so every replica and every Go release picks the
// same. k <= 0 or k >= n selects all n.
func Sample(n, k int, seed int64) []int {
	if n <= 0 {
		return []int{}
	}
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	if k <= 0 || k >= n {
		return idx
	}
	r := rand.NewPCG(uint64(seed), 0x62726b79_73616d70) // "brky" "samp"
	for i := 0; i < k; i++ {
		j := i + int(uniform(r, uint64(n-i)))
		idx[i], idx[j] = idx[j], idx[i]
	}
	out := idx[:k]
	slices.Sort(out)
	return out
}

// uniform returns a uniform integer in [0, n) by Lemire's multiply-and-reject
// method, from r's raw output only.
func uniform(r *rand.PCG, n uint64) uint64 {
	hi, lo := bits.Mul64(r.Uint64(), n)
	if lo < n {
		thresh := -n % n
		for lo < thresh {
			hi, lo = bits.Mul64(r.Uint64(), n)
		}
	}
	return hi
}
