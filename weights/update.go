package weights

import (
	"fmt"
	"strconv"
	"strings"
)

// Tensor is one parameter array of an update.
type Tensor struct {
	DType DType
	// Shape is the array's shape; empty for a scalar.
	Shape []int
	// Fortran is set when Data is in column-major (Fortran) order.
	Fortran bool
	// Offset is where the tensor's bytes start in the file.
	Offset int64
	// Data holds the tensor's bytes as stored, in DType's byte order. It is
	// nil when the update was indexed or scanned rather than decoded.
	Data []byte
}

// Len returns the number of elements.
func (t *Tensor) Len() int64 { return shapeLen(t.Shape) }

// NBytes returns the size of the tensor's data in bytes.
func (t *Tensor) NBytes() int64 { return t.Len() * int64(t.DType.Size) }

// ShapeString formats the shape as numpy does: "(16, 8, 3, 3)", "(8,)", "()".
func (t *Tensor) ShapeString() string { return FormatShape(t.Shape) }

// FormatShape formats a shape as numpy does: "(16, 8, 3, 3)", "(8,)", "()".
func FormatShape(shape []int) string {
	var b strings.Builder
	b.WriteByte('(')
	for i, n := range shape {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(n))
	}
	if len(shape) == 1 {
		b.WriteByte(',')
	}
	b.WriteByte(')')
	return b.String()
}

func shapeLen(shape []int) int64 {
	n := int64(1)
	for _, d := range shape {
		n *= int64(d)
	}
	return n
}

// Update is a decoded weights file: the number of training samples behind it
// and its parameter tensors in model order.
type Update struct {
	NumSamples int64
	Tensors    []Tensor
	// Size is the file's length in bytes, as far as it was read.
	Size int64
}

// Params returns the total number of parameters (elements) of all tensors.
func (u *Update) Params() int64 {
	var n int64
	for i := range u.Tensors {
		n += u.Tensors[i].Len()
	}
	return n
}

// DataBytes returns the total size of all tensors' data.
func (u *Update) DataBytes() int64 {
	var n int64
	for i := range u.Tensors {
		n += u.Tensors[i].NBytes()
	}
	return n
}

// Signature describes the tensors' dtypes and shapes in one line, e.g.
// "<f4(8, 1, 5, 5);<f4(8,)". Two updates can be aggregated together when
// their tensors agree; Compare says where they do not.
func (u *Update) Signature() string {
	var b strings.Builder
	for i := range u.Tensors {
		if i > 0 {
			b.WriteByte(';')
		}
		b.WriteString(u.Tensors[i].DType.String())
		b.WriteString(u.Tensors[i].ShapeString())
	}
	return b.String()
}

// ParseSignature parses what Signature returns into tensors without data.
func ParseSignature(s string) ([]Tensor, error) {
	if s == "" {
		return nil, nil
	}
	parts := strings.Split(s, ";")
	ts := make([]Tensor, 0, len(parts))
	for _, p := range parts {
		i := strings.IndexByte(p, '(')
		if i < 0 || !strings.HasSuffix(p, ")") {
			return nil, fmt.Errorf("bad signature part %q", p)
		}
		dt, err := ParseDType(p[:i])
		if err != nil {
			return nil, err
		}
		var shape []int
		for _, f := range strings.Split(p[i+1:len(p)-1], ",") {
			f = strings.TrimSpace(f)
			if f == "" {
				continue
			}
			n, err := strconv.Atoi(f)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("bad dimension %q in signature part %q", f, p)
			}
			shape = append(shape, n)
		}
		ts = append(ts, Tensor{DType: dt, Shape: shape})
	}
	return ts, nil
}

// Compare reports the first way tensors b disagree with tensors a, so that
// they cannot be aggregated together: the tensor count, a shape, or the kind
// of a dtype (float against integer). It returns "" when they agree. The
// message names the tensor: "tensor 2 has shape (16, 8, 5, 5), expected
// (16, 8, 3, 3)".
func Compare(a, b []Tensor) string {
	if len(a) != len(b) {
		return fmt.Sprintf("has %d tensors, expected %d", len(b), len(a))
	}
	for i := range a {
		x, y := &a[i], &b[i]
		if !sameShape(x.Shape, y.Shape) {
			return fmt.Sprintf("tensor %d has shape %s, expected %s", i, y.ShapeString(), x.ShapeString())
		}
		if x.DType.IsFloat() != y.DType.IsFloat() {
			return fmt.Sprintf("tensor %d has dtype %s, expected %s", i, y.DType, x.DType)
		}
	}
	return ""
}

func sameShape(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
