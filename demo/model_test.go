package demo_test

import (
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/demo"
)

func tensorsEqual(a, b []demo.Tensor) bool {
	return slices.EqualFunc(a, b, func(x, y demo.Tensor) bool {
		return slices.Equal(x.Shape, y.Shape) && slices.Equal(x.Data, y.Data)
	})
}

func TestNewModel(t *testing.T) {
	ts := demo.NewModel(32, 1).Tensors()
	wantShapes := [][]int{{64, 32}, {32}, {32, 10}, {10}}
	if len(ts) != len(wantShapes) {
		t.Fatalf("got %d tensors, want %d", len(ts), len(wantShapes))
	}
	for i, tensor := range ts {
		if !slices.Equal(tensor.Shape, wantShapes[i]) {
			t.Errorf("tensor %d has shape %v, want %v", i, tensor.Shape, wantShapes[i])
		}
		n := 1
		for _, d := range tensor.Shape {
			n *= d
		}
		if len(tensor.Data) != n {
			t.Errorf("tensor %d has %d values for shape %v", i, len(tensor.Data), tensor.Shape)
		}
	}
	if !tensorsEqual(ts, demo.NewModel(32, 1).Tensors()) {
		t.Error("the same seed gave different weights")
	}
	if tensorsEqual(ts, demo.NewModel(32, 2).Tensors()) {
		t.Error("seeds 1 and 2 gave the same weights")
	}
}

func TestModelFromTensors(t *testing.T) {
	t.Run("OK", func(t *testing.T) {
		want := demo.NewModel(16, 3).Tensors()
		m, err := demo.ModelFromTensors(want)
		if err != nil {
			t.Fatal(err)
		}
		if m.Hidden() != 16 {
			t.Errorf("hidden %d, want 16", m.Hidden())
		}
		if !tensorsEqual(m.Tensors(), want) {
			t.Error("round trip through ModelFromTensors changed the weights")
		}
		// Neither the input nor the output may alias the model.
		want[0].Data[0]++
		got := m.Tensors()
		got[2].Data[0]++
		if again := m.Tensors(); again[0].Data[0] == want[0].Data[0] || again[2].Data[0] == got[2].Data[0] {
			t.Error("the model shares memory with a tensor list")
		}
	})

	// Each case breaks one thing in a valid (64, 8) model.
	tests := []struct {
		name   string
		mutate func([]demo.Tensor) []demo.Tensor
		want   string
	}{
		{"ErrTooFewTensors", func(ts []demo.Tensor) []demo.Tensor { return ts[:3] }, "model has 3 tensors, want 4"},
		{"ErrInputs", func(ts []demo.Tensor) []demo.Tensor {
			ts[0] = demo.Tensor{Shape: []int{63, 8}, Data: make([]float32, 63*8)}
			return ts
		}, "tensor 0 (W1) has shape (63, 8), want (64, H)"},
		{"ErrHiddenMismatch", func(ts []demo.Tensor) []demo.Tensor {
			ts[2] = demo.Tensor{Shape: []int{9, 10}, Data: make([]float32, 90)}
			return ts
		}, "tensor 2 (W2) has shape (9, 10), want (8, 10)"},
		{"ErrBiasRank", func(ts []demo.Tensor) []demo.Tensor {
			ts[3].Shape = []int{1, 10}
			return ts
		}, "tensor 3 (b2) has shape (1, 10), want (10,)"},
		{"ErrDataLength", func(ts []demo.Tensor) []demo.Tensor {
			ts[1].Data = ts[1].Data[:7]
			return ts
		}, "tensor 1 (b1) has 7 values, its shape (8,) holds 8"},
		{"ErrNaN", func(ts []demo.Tensor) []demo.Tensor {
			ts[2].Data[5] = float32(math.NaN())
			return ts
		}, "tensor 2 (W2) value 5 is NaN"},
		{"ErrInf", func(ts []demo.Tensor) []demo.Tensor {
			ts[0].Data[0] = float32(math.Inf(-1))
			return ts
		}, "tensor 0 (W1) value 0 is -Inf"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := demo.ModelFromTensors(tt.mutate(demo.NewModel(8, 1).Tensors()))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got error %v, want one containing %q", err, tt.want)
			}
		})
	}
}
