package aggregate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"

	"github.com/branchkey/branchkey/weights"
)

// Input is one weights file to aggregate, or a global model or optimizer
// state: bytes at R, Size long, named Name in errors and results. Files and
// blob-store objects both fit, since only ReadAt is used, from several
// goroutines at once.
type Input struct {
	Name string
	R    io.ReaderAt
	Size int64
	// Update is R's index (weights.Index(R, Size)) when the caller already
	// has it; nil makes the engine index R itself.
	Update *weights.Update
}

// Roles of inputs, as InputError names them.
const (
	roleUpdate = "update"
	roleGlobal = "global model"
	roleState  = "state"
)

// source is an indexed input ready to be read block by block.
type source struct {
	role, name string
	r          io.ReaderAt
	u          *weights.Update
	// slots is the number of elements per coordinate: 1 for updates and
	// the global model, the strategy's slots for a state file.
	slots int
	// wf and wi weigh the source's float and integer tensors in a sum.
	wf, wi float64
}

// open indexes in (unless it comes indexed) as a source of the given role.
func open(ctx context.Context, in Input, role string) (*source, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if in.R == nil {
		return nil, &InputError{Role: role, Input: in.Name, Tensor: -1, Kind: ErrMalformed, Msg: "no reader"}
	}
	u := in.Update
	if u == nil {
		var err error
		u, err = weights.Index(in.R, in.Size)
		if err != nil {
			t := -1
			if we := weights.AsError(err); we != nil {
				t = we.Tensor
			}
			return nil, &InputError{Role: role, Input: in.Name, Tensor: t, Kind: ErrMalformed, Msg: err.Error(), Err: err}
		}
	}
	for i := range u.Tensors {
		if !u.Tensors[i].DType.Valid() {
			return nil, &InputError{Role: role, Input: in.Name, Tensor: i, Kind: ErrMalformed, Msg: fmt.Sprintf("tensor %d has unsupported dtype %s", i, u.Tensors[i].DType)}
		}
	}
	return &source{role: role, name: in.Name, r: in.R, u: u, slots: 1}, nil
}

// layout is the model every input must match: the reference's tensors and
// where each starts in the flat coordinate space that blocks walk.
type layout struct {
	ref     string           // "the first update's", "the global model's"
	tensors []weights.Tensor // dtype, shape and order of the output
	starts  []int64          // starts[k] is tensor k's first coordinate; starts[T] the total
	float   []bool
}

func newLayout(u *weights.Update, ref string) *layout {
	l := &layout{ref: ref, tensors: make([]weights.Tensor, len(u.Tensors)), starts: make([]int64, len(u.Tensors)+1), float: make([]bool, len(u.Tensors))}
	for k, t := range u.Tensors {
		l.tensors[k] = weights.Tensor{DType: t.DType, Shape: t.Shape, Fortran: t.Fortran}
		l.starts[k+1] = l.starts[k] + t.Len()
		l.float[k] = t.DType.IsFloat()
	}
	return l
}

func (l *layout) params() int64 { return l.starts[len(l.tensors)] }

// check reports how s disagrees with the layout, as an *InputError of kind
// ErrMismatch, or nil.
func (l *layout) check(s *source) error {
	mismatch := func(k int, format string, args ...any) error {
		return &InputError{Role: s.role, Input: s.name, Tensor: k, Kind: ErrMismatch, Msg: fmt.Sprintf(format, args...)}
	}
	ts := s.u.Tensors
	if len(ts) != len(l.tensors) {
		return mismatch(-1, "has %d tensors, %s has %d", len(ts), l.ref, len(l.tensors))
	}
	for k := range ts {
		a, b := &l.tensors[k], &ts[k]
		if !slices.Equal(a.Shape, b.Shape) {
			return mismatch(k, "tensor %d has shape %s, %s is %s", k, b.ShapeString(), l.ref, a.ShapeString())
		}
		if a.DType.IsFloat() != b.DType.IsFloat() {
			return mismatch(k, "tensor %d has dtype %s, %s is %s", k, b.DType.Name(), l.ref, a.DType.Name())
		}
		if a.Fortran != b.Fortran && orderMatters(a.Shape) {
			return mismatch(k, "tensor %d is stored in %s order, %s in %s order", k, orderName(b.Fortran), l.ref, orderName(a.Fortran))
		}
	}
	return nil
}

// orderMatters reports whether C and Fortran order lay out a shape's
// elements differently: when more than one dimension is longer than 1.
func orderMatters(shape []int) bool {
	n := 0
	for _, d := range shape {
		if d > 1 {
			n++
		}
	}
	return n > 1
}

func orderName(fortran bool) string {
	if fortran {
		return "Fortran"
	}
	return "C"
}

// stateTensors returns the tensors of a state file for the layout with
// slots values per parameter: float64, interleaved per parameter, so that a
// state file streams in coordinate order. For a C-order tensor of shape s
// the state tensor has shape s + (slots,) in C order; for a Fortran-order one
// (slots,) + s in Fortran order. Either way numpy indexes it naturally
// (state[..., 0] or state[0, ...] is the first slot).
func (l *layout) stateTensors(slots int) []weights.Tensor {
	ts := make([]weights.Tensor, len(l.tensors))
	for k, t := range l.tensors {
		var shape []int
		if t.Fortran {
			shape = append([]int{slots}, t.Shape...)
		} else {
			shape = append(slices.Clone(t.Shape), slots)
		}
		ts[k] = weights.Tensor{DType: weights.Float64, Shape: shape, Fortran: t.Fortran}
	}
	return ts
}

// checkState reports how a state source disagrees with the layout.
func (l *layout) checkState(s *source, slots int) error {
	want := l.stateTensors(slots)
	ts := s.u.Tensors
	mismatch := func(k int, format string, args ...any) error {
		return &InputError{Role: s.role, Input: s.name, Tensor: k, Kind: ErrMismatch, Msg: fmt.Sprintf(format, args...)}
	}
	if len(ts) != len(want) {
		return mismatch(-1, "has %d tensors, the model has %d", len(ts), len(want))
	}
	for k := range ts {
		if !slices.Equal(ts[k].Shape, want[k].Shape) || (ts[k].Fortran != want[k].Fortran && orderMatters(want[k].Shape)) {
			return mismatch(k, "tensor %d has shape %s (%s order), the model needs %s (%s order)", k, ts[k].ShapeString(), orderName(ts[k].Fortran), want[k].ShapeString(), orderName(want[k].Fortran))
		}
		if !ts[k].DType.IsFloat() {
			return mismatch(k, "tensor %d has dtype %s, state is float", k, ts[k].DType.Name())
		}
	}
	return nil
}

// seg is the part of one tensor that falls in a block.
type seg struct {
	k   int   // tensor
	off int64 // first element within the tensor
	n   int   // elements
	pos int   // first coordinate within the block
}

// segments appends to segs the tensor pieces of the block [start, start+n).
func (l *layout) segments(segs []seg, start int64, n int) []seg {
	segs = segs[:0]
	end := start + int64(n)
	k := sort.Search(len(l.tensors), func(i int) bool { return l.starts[i+1] > start })
	for c := start; c < end && k < len(l.tensors); k++ {
		if l.starts[k+1] == l.starts[k] {
			continue
		}
		m := min(end, l.starts[k+1]) - c
		segs = append(segs, seg{k: k, off: c - l.starts[k], n: int(m), pos: int(c - start)})
		c += m
	}
	return segs
}

// maxGap is the most pickle bytes between two tensors' data that a read
// spans rather than splitting in two.
const maxGap = 4096

// read reads the bytes of segs from s into *buf (grown if needed) with as
// few ReadAt calls as the file's layout allows, and sets views[i] to the
// bytes of segs[i]. It returns the bytes read.
func (s *source) read(segs []seg, buf *[]byte, views *[][]byte) (int64, error) {
	v := (*views)[:0]
	type rng struct{ off, end int64 }
	// First pass: size the buffer for the merged ranges.
	need := int64(0)
	var cur rng
	for i, sg := range segs {
		t := &s.u.Tensors[sg.k]
		es := int64(t.DType.Size * s.slots)
		r := rng{t.Offset + sg.off*es, t.Offset + (sg.off+int64(sg.n))*es}
		if i > 0 && r.off >= cur.end && r.off-cur.end <= maxGap {
			cur.end = r.end
			continue
		}
		need += cur.end - cur.off
		cur = r
	}
	need += cur.end - cur.off
	if int64(cap(*buf)) < need {
		*buf = make([]byte, need)
	}
	b := (*buf)[:need]
	// Second pass: read each merged range and cut the views.
	var total int64
	pos := int64(0) // where cur starts in b
	cur = rng{}
	flush := func() error {
		if cur.end == cur.off {
			return nil
		}
		m, err := s.r.ReadAt(b[pos:pos+cur.end-cur.off], cur.off)
		total += int64(m)
		if int64(m) == cur.end-cur.off {
			err = nil // io.ReaderAt may return io.EOF with the last byte
		} else if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return fmt.Errorf("%s %s: read %d bytes at %d: %w", s.role, s.name, cur.end-cur.off, cur.off, err)
		}
		pos += cur.end - cur.off
		return nil
	}
	for i, sg := range segs {
		t := &s.u.Tensors[sg.k]
		es := int64(t.DType.Size * s.slots)
		r := rng{t.Offset + sg.off*es, t.Offset + (sg.off+int64(sg.n))*es}
		if i > 0 && r.off >= cur.end && r.off-cur.end <= maxGap {
			cur.end = r.end
		} else {
			if err := flush(); err != nil {
				return total, err
			}
			cur = r
		}
		// The view's place in b: pos (start of cur) + offset within cur.
		at := pos + (r.off - cur.off)
		v = append(v, b[at:at+(r.end-r.off)])
	}
	if err := flush(); err != nil {
		return total, err
	}
	*views = v
	return total, nil
}
