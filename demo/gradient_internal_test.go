package demo

import (
	"math"
	"math/rand/v2"
	"testing"
)

// TestBackwardMatchesFiniteDifferences pins the hand-written gradients: for
// every parameter, backward must agree with the slope of the loss measured by
// nudging that parameter up and down.
func TestBackwardMatchesFiniteDifferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	m := NewModel(5, 1)
	for i := range m.b1 {
		m.b1[i] = 0.1 // keep most ReLUs on so W2 and W1 get gradient
	}
	var x [NumFeatures]float32
	for i := range x {
		if rng.IntN(3) > 0 {
			x[i] = float32(rng.IntN(17)) / 16
		}
	}
	const label = 3

	lossAt := func() float64 {
		h := make([]float32, m.hidden)
		var z, p [NumClasses]float32
		m.forward(&x, h, &z)
		return softmax(&z, label, &p)
	}

	g := &Model{hidden: m.hidden, w1: make([]float32, len(m.w1)), b1: make([]float32, len(m.b1)),
		w2: make([]float32, len(m.w2)), b2: make([]float32, len(m.b2))}
	h := make([]float32, m.hidden)
	var z, p [NumClasses]float32
	m.forward(&x, h, &z)
	softmax(&z, label, &p)
	p[label]--
	m.backward(&x, h, &p, make([]float32, m.hidden), g)

	params := []struct {
		name      string
		val, grad []float32
	}{{"W1", m.w1, g.w1}, {"b1", m.b1, g.b1}, {"W2", m.w2, g.w2}, {"b2", m.b2, g.b2}}
	const eps = 1e-2
	for _, par := range params {
		for i := range par.val {
			orig := par.val[i]
			par.val[i] = orig + eps
			up := lossAt()
			par.val[i] = orig - eps
			down := lossAt()
			par.val[i] = orig
			numeric := (up - down) / (2 * eps)
			if diff := math.Abs(numeric - float64(par.grad[i])); diff > 2e-3+0.02*math.Abs(numeric) {
				t.Errorf("%s[%d]: backward %.5f, finite difference %.5f", par.name, i, par.grad[i], numeric)
			}
		}
	}
}
