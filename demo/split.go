package demo

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// PCG streams, one per use of a seed, so that the split, the partition and
// the initial weights (streamInit) draw independent numbers even when the
// caller gives them all the same seed.
const (
	streamSplit     = 0x5eed_0001
	streamPartition = 0x5eed_0002
)

// DefaultTestFraction is the share of each class the demo holds out for
// evaluation.
const DefaultTestFraction = 0.2

// SplitTrainTest divides samples into a training set and a test set holding
// testFraction of each class (rounded to the nearest sample), chosen at random
// from seed. Both sets keep the input order, so the same seed and input give
// the same split. It panics if testFraction is not strictly between 0 and 1.
func SplitTrainTest(samples []Sample, testFraction float64, seed uint64) (train, test []Sample) {
	if !(testFraction > 0 && testFraction < 1) {
		panic(fmt.Sprintf("demo: test fraction %v is not between 0 and 1", testFraction))
	}
	rng := rand.New(rand.NewPCG(seed, streamSplit))
	inTest := make([]bool, len(samples))
	for _, idx := range indicesByClass(samples) {
		rng.Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
		k := int(math.Round(testFraction * float64(len(idx))))
		for _, i := range idx[:k] {
			inTest[i] = true
		}
	}
	for i, s := range samples {
		if inTest[i] {
			test = append(test, s)
		} else {
			train = append(train, s)
		}
	}
	return train, test
}

// MinLeafSamples is the fewest samples [Partition] gives a leaf when there
// are enough to go round; with fewer, every leaf gets len(samples)/n.
const MinLeafSamples = 10

// DefaultAlpha is the label-skew concentration the demo partitions with: most
// leaves see a few digits far more often than the rest.
const DefaultAlpha = 0.5

// Partition deals samples out to n leaves with size skew and label skew, the
// non-IID setting federated learning is for.
//
// Sizes: each leaf's expected share s_k of the samples is a uniformly random
// point on the simplex, Dirichlet(1, ..., 1), as if the data were cut at n-1
// uniformly random places; with 4 leaves the largest typically holds several
// times as many samples as the smallest.
//
// Labels: each class is split over the leaves in proportions drawn from
// Dirichlet(alpha*n*s_1, ..., alpha*n*s_n), whose mean is the size shares, so
// leaf k gets about s_k of the data but an uneven mix of digits. A small alpha
// (0.1-0.5) leaves each leaf with mostly a few digits, a large one (100) gives
// every leaf nearly the overall mix; with equal shares this is the usual
// per-class Dirichlet(alpha) split.
//
// Leaves that come out smaller than min(MinLeafSamples, len(samples)/n) are
// topped up with samples taken from the largest leaf's most common class, so
// every leaf can train. Within a leaf, samples are ordered by class; [Train]
// shuffles them. The same samples, n, alpha and seed give the same partition.
// Partition fails if n is less than 1 or more than len(samples), or alpha is
// not positive and finite.
func Partition(samples []Sample, n int, alpha float64, seed uint64) ([][]Sample, error) {
	switch {
	case n < 1:
		return nil, fmt.Errorf("partition over %d leaves: need at least 1", n)
	case n > len(samples):
		return nil, fmt.Errorf("partition %d samples over %d leaves: need at least one sample per leaf", len(samples), n)
	case !(alpha > 0) || math.IsInf(alpha, 1):
		return nil, fmt.Errorf("partition with alpha %v: need a positive, finite concentration", alpha)
	}
	rng := rand.New(rand.NewPCG(seed, streamPartition))

	ones := make([]float64, n)
	for k := range ones {
		ones[k] = 1
	}
	conc := dirichlet(rng, ones)
	for k := range conc {
		conc[k] *= alpha * float64(n)
	}

	// leafClass[k][c] lists the indices of class c samples given to leaf k.
	leafClass := make([][NumClasses][]int, n)
	for c, idx := range indicesByClass(samples) {
		rng.Shuffle(len(idx), func(i, j int) { idx[i], idx[j] = idx[j], idx[i] })
		counts := apportion(dirichlet(rng, conc), len(idx))
		for k, cnt := range counts {
			leafClass[k][c] = idx[:cnt:cnt]
			idx = idx[cnt:]
		}
	}

	size := func(k int) int {
		total := 0
		for _, idx := range leafClass[k] {
			total += len(idx)
		}
		return total
	}
	minSize := min(MinLeafSamples, len(samples)/n)
	for k := range leafClass {
		for size(k) < minSize {
			donor := 0
			for j := range leafClass {
				if size(j) > size(donor) {
					donor = j
				}
			}
			c := 0
			for j := range leafClass[donor] {
				if len(leafClass[donor][j]) > len(leafClass[donor][c]) {
					c = j
				}
			}
			from := leafClass[donor][c]
			leafClass[donor][c] = from[:len(from)-1]
			leafClass[k][c] = append(leafClass[k][c], from[len(from)-1])
		}
	}

	leaves := make([][]Sample, n)
	for k := range leafClass {
		leaves[k] = make([]Sample, 0, size(k))
		for _, idx := range leafClass[k] {
			for _, i := range idx {
				leaves[k] = append(leaves[k], samples[i])
			}
		}
	}
	return leaves, nil
}

// indicesByClass returns, per label, the indices of samples with that label in
// input order.
func indicesByClass(samples []Sample) [NumClasses][]int {
	var by [NumClasses][]int
	for i, s := range samples {
		by[s.Label] = append(by[s.Label], i)
	}
	return by
}

// apportion splits total into len(p) whole counts proportional to p (which
// sums to 1) by the largest-remainder method, so the counts sum to total.
func apportion(p []float64, total int) []int {
	counts := make([]int, len(p))
	rem := make([]int, len(p))
	left := total
	for i, pi := range p {
		counts[i] = int(pi * float64(total))
		left -= counts[i]
		rem[i] = i
	}
	frac := func(i int) float64 { return p[i]*float64(total) - float64(counts[i]) }
	// Stable so ties go to the lower leaf index and the result is deterministic.
	slices.SortStableFunc(rem, func(a, b int) int {
		switch fa, fb := frac(a), frac(b); {
		case fa > fb:
			return -1
		case fa < fb:
			return 1
		}
		return 0
	})
	for i := 0; i < left; i++ {
		counts[rem[i%len(rem)]]++
	}
	return counts
}

// dirichlet draws proportions from a Dirichlet(a) distribution by
// normalising independent Gamma(a[i], 1) draws.
func dirichlet(rng *rand.Rand, a []float64) []float64 {
	p := make([]float64, len(a))
	sum := 0.0
	for i := range p {
		p[i] = gamma(rng, a[i])
		sum += p[i]
	}
	if sum == 0 {
		// All draws underflowed, which takes concentrations far below any
		// useful alpha: put all mass on one leaf, the distribution's limit.
		p[rng.IntN(len(a))] = 1
		return p
	}
	for i := range p {
		p[i] /= sum
	}
	return p
}

// gamma draws from Gamma(alpha, 1) by Marsaglia and Tsang's method ("A Simple
// Method for Generating Gamma Variables", 2000), boosting alpha < 1 by
// Gamma(alpha) = Gamma(alpha+1) * U^(1/alpha).
func gamma(rng *rand.Rand, alpha float64) float64 {
	if alpha < 1 {
		return gamma(rng, alpha+1) * math.Pow(rng.Float64(), 1/alpha)
	}
	d := alpha - 1.0/3
	c := 1 / math.Sqrt(9*d)
	for {
		x := rng.NormFloat64()
		v := 1 + c*x
		if v <= 0 {
			continue
		}
		v = v * v * v
		u := rng.Float64()
		if u < 1-0.0331*x*x*x*x || math.Log(u) < 0.5*x*x+d*(1-v+math.Log(v)) {
			return d * v
		}
	}
}
