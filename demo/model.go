package demo

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
)

// Tensor is one parameter array: a shape and its values in row-major order,
// so len(Data) is the product of Shape.
type Tensor struct {
	Shape []int
	Data  []float32
}

// Model is a multilayer perceptron for the digits: 64 inputs, one hidden
// layer of H ReLU units and 10 softmax outputs. Its parameters, in the order
// [Model.Tensors] returns them, are W1 (64, H), b1 (H), W2 (H, 10) and
// b2 (10); the logits for input x are (relu(x·W1 + b1))·W2 + b2.
//
// A Model is not safe for concurrent use; give each leaf its own.
type Model struct {
	hidden int
	w1     []float32 // (NumFeatures, hidden): w1[i*hidden+j] joins input i to unit j.
	b1     []float32 // (hidden)
	w2     []float32 // (hidden, NumClasses): w2[j*NumClasses+k] joins unit j to class k.
	b2     []float32 // (NumClasses)
}

// DefaultHidden is the hidden-layer width the demo uses: wide enough to pass
// 95% test accuracy on the digits, small enough (2,410 parameters) that a
// leaf's local training takes tens of milliseconds a round.
const DefaultHidden = 32

// streamInit is the PCG stream for initial weights; see streamSplit.
const streamInit = 0x5eed_0003

// NewModel returns a model with hidden units, its weights drawn from seed
// (He-normal for W1, which feeds ReLUs, Glorot-normal for W2) and its biases
// zero. The same hidden and seed give the same weights. It panics if hidden
// is less than 1.
func NewModel(hidden int, seed uint64) *Model {
	if hidden < 1 {
		panic(fmt.Sprintf("demo: model with %d hidden units", hidden))
	}
	rng := rand.New(rand.NewPCG(seed, streamInit))
	m := &Model{
		hidden: hidden,
		w1:     make([]float32, NumFeatures*hidden),
		b1:     make([]float32, hidden),
		w2:     make([]float32, hidden*NumClasses),
		b2:     make([]float32, NumClasses),
	}
	std1 := math.Sqrt(2.0 / NumFeatures)
	for i := range m.w1 {
		m.w1[i] = float32(rng.NormFloat64() * std1)
	}
	std2 := math.Sqrt(2.0 / float64(hidden+NumClasses))
	for i := range m.w2 {
		m.w2[i] = float32(rng.NormFloat64() * std2)
	}
	return m
}

// ModelFromTensors builds a model from parameters in the order and shapes
// [Model.Tensors] returns, such as a downloaded aggregate. It copies the data.
// It fails, naming the offending tensor, if there are not exactly four
// tensors, a shape does not fit, a data length does not match its shape, or a
// value is NaN or infinite.
func ModelFromTensors(ts []Tensor) (*Model, error) {
	if len(ts) != 4 {
		return nil, fmt.Errorf("model has %d tensors, want 4 (W1, b1, W2, b2)", len(ts))
	}
	if len(ts[0].Shape) != 2 || ts[0].Shape[0] != NumFeatures || ts[0].Shape[1] < 1 {
		return nil, fmt.Errorf("tensor 0 (W1) has shape %s, want (%d, H) with H >= 1", shapeString(ts[0].Shape), NumFeatures)
	}
	h := ts[0].Shape[1]
	want := [][]int{{NumFeatures, h}, {h}, {h, NumClasses}, {NumClasses}}
	names := []string{"W1", "b1", "W2", "b2"}
	for i, t := range ts {
		if !slices.Equal(t.Shape, want[i]) {
			return nil, fmt.Errorf("tensor %d (%s) has shape %s, want %s", i, names[i], shapeString(t.Shape), shapeString(want[i]))
		}
		if n := numElements(want[i]); len(t.Data) != n {
			return nil, fmt.Errorf("tensor %d (%s) has %d values, its shape %s holds %d", i, names[i], len(t.Data), shapeString(t.Shape), n)
		}
		for j, v := range t.Data {
			if f := float64(v); math.IsNaN(f) || math.IsInf(f, 0) {
				return nil, fmt.Errorf("tensor %d (%s) value %d is %v", i, names[i], j, v)
			}
		}
	}
	return &Model{
		hidden: h,
		w1:     slices.Clone(ts[0].Data),
		b1:     slices.Clone(ts[1].Data),
		w2:     slices.Clone(ts[2].Data),
		b2:     slices.Clone(ts[3].Data),
	}, nil
}

// Tensors returns copies of the model's parameters in upload order: W1
// (64, H), b1 (H), W2 (H, 10), b2 (10), each row-major.
func (m *Model) Tensors() []Tensor {
	return []Tensor{
		{Shape: []int{NumFeatures, m.hidden}, Data: slices.Clone(m.w1)},
		{Shape: []int{m.hidden}, Data: slices.Clone(m.b1)},
		{Shape: []int{m.hidden, NumClasses}, Data: slices.Clone(m.w2)},
		{Shape: []int{NumClasses}, Data: slices.Clone(m.b2)},
	}
}

// Hidden returns the number of hidden units, H.
func (m *Model) Hidden() int { return m.hidden }

// Predict returns the most likely digit for features, which must be scaled
// like [Sample.Features].
func (m *Model) Predict(features [NumFeatures]float32) int {
	h := make([]float32, m.hidden)
	var z [NumClasses]float32
	m.forward(&features, h, &z)
	return argmax(&z)
}

// forward computes the hidden activations into h and the logits into z.
func (m *Model) forward(x *[NumFeatures]float32, h []float32, z *[NumClasses]float32) {
	copy(h, m.b1)
	for i, xi := range x {
		if xi == 0 { // about half the pixels are blank
			continue
		}
		row := m.w1[i*m.hidden : (i+1)*m.hidden]
		for j, w := range row {
			h[j] += xi * w
		}
	}
	*z = [NumClasses]float32(m.b2)
	for j, hj := range h {
		if hj <= 0 {
			h[j] = 0
			continue
		}
		row := m.w2[j*NumClasses : (j+1)*NumClasses]
		for k, w := range row {
			z[k] += hj * w
		}
	}
}

// softmax turns logits z into probabilities p and returns the cross-entropy
// loss -log p[label], computed stably in float64.
func softmax(z *[NumClasses]float32, label int, p *[NumClasses]float32) float64 {
	zmax := z[0]
	for _, v := range z[1:] {
		zmax = max(zmax, v)
	}
	var sum float64
	var e [NumClasses]float64
	for k, v := range z {
		e[k] = math.Exp(float64(v - zmax))
		sum += e[k]
	}
	for k := range p {
		p[k] = float32(e[k] / sum)
	}
	return math.Log(sum) - float64(z[label]-zmax)
}

func argmax(z *[NumClasses]float32) int {
	best := 0
	for k, v := range z {
		if v > z[best] {
			best = k
		}
	}
	return best
}

func numElements(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// shapeString formats a shape like numpy does: (64, 32), (10,).
func shapeString(shape []int) string {
	switch len(shape) {
	case 0:
		return "()"
	case 1:
		return fmt.Sprintf("(%d,)", shape[0])
	}
	s := "("
	for i, d := range shape {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprint(d)
	}
	return s + ")"
}
