package weights

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
)

// pickleBatch is the pickler's APPENDS batch size.
const pickleBatch = 1000

// Encoder writes an update in numpy's format, streaming the tensors' bytes:
// NewEncoder writes everything up to the first tensor's data, each Write
// carries on with the data (tensor after tensor, in DType's byte order and
// the tensor's C or Fortran order), and Close writes the end.
//
// The output is byte for byte what numpy 1.x's np.save writes for an object
// array (num_samples, [arrays]) whose arrays have those dtypes, shapes and
// bytes, with native-order dtypes shared between arrays as numpy's own
// singletons are.
type Encoder struct {
	w       *bufio.Writer
	tensors []Tensor
	i       int   // tensor whose data is being written
	left    int64 // bytes of it still to come
	memo    uint32
	// memo indices of shared objects: numpy's dtype singletons, the
	// one-character byte-order strings and the empty bytes object.
	dtypes  map[DType]uint32
	chars   map[byte]uint32
	empty   uint32
	hasNil  bool
	closed  bool
	written int64
	err     error
}

// Memo indices of the objects every update pickle starts with.
const (
	memoReconstruct = 0
	memoNDArray     = 1
	memoCharB       = 3
	memoDTypeGlobal = 7
)

// NewEncoder starts writing an update of numSamples samples and the given
// tensors (their Data is ignored; the bytes come through Write).
func NewEncoder(w io.Writer, numSamples int64, tensors []Tensor) (*Encoder, error) {
	if numSamples <= 0 {
		return nil, fmt.Errorf("num_samples is %d; it must be positive", numSamples)
	}
	if len(tensors) == 0 {
		return nil, errors.New("an update needs at least one tensor")
	}
	for i := range tensors {
		t := &tensors[i]
		if !t.DType.Valid() {
			return nil, fmt.Errorf("tensor %d: unsupported dtype %v", i, t.DType)
		}
		if len(t.Shape) > maxDims {
			return nil, fmt.Errorf("tensor %d: %d dimensions; at most %d are allowed", i, len(t.Shape), maxDims)
		}
		for _, n := range t.Shape {
			if n < 0 {
				return nil, fmt.Errorf("tensor %d: negative dimension in shape %s", i, t.ShapeString())
			}
		}
	}
	e := &Encoder{
		w:       bufio.NewWriterSize(w, 64<<10),
		tensors: tensors,
		dtypes:  map[DType]uint32{},
		chars:   map[byte]uint32{},
	}
	e.w.Write(objectArrayHeader())
	e.prologue(numSamples)
	e.startTensor()
	return e, e.err
}

// Encode writes u, with every tensor's Data, to w.
func Encode(w io.Writer, u *Update) error {
	e, err := NewEncoder(w, u.NumSamples, u.Tensors)
	if err != nil {
		return err
	}
	for i := range u.Tensors {
		t := &u.Tensors[i]
		if int64(len(t.Data)) != t.NBytes() {
			return fmt.Errorf("tensor %d: shape %s of %s needs %d bytes, Data has %d", i, t.ShapeString(), t.DType, t.NBytes(), len(t.Data))
		}
		if _, err := e.Write(t.Data); err != nil {
			return err
		}
	}
	return e.Close()
}

// WriteFile writes u to the named file atomically (see CreateOutput).
func WriteFile(path string, u *Update) error {
	o, err := CreateOutput(path)
	if err != nil {
		return err
	}
	defer o.Abort()
	if err := Encode(o, u); err != nil {
		return err
	}
	return o.Commit()
}

// OutputFile is an output file written whole or not at all: its bytes go
// to a temporary file beside the path, which Commit syncs and renames over
// it, so a failed run leaves no partial file. When the path names something
// other than a regular file (/dev/null, a pipe), the bytes go straight to
// it, and the device stays a device.
type OutputFile struct {
	f      *os.File
	path   string
	direct bool
	done   bool
}

// CreateOutput starts an output file at path.
func CreateOutput(path string) (*OutputFile, error) {
	if fi, err := os.Stat(path); err == nil && !fi.Mode().IsRegular() {
		if fi.IsDir() {
			return nil, fmt.Errorf("%s is a directory", path)
		}
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		return &OutputFile{f: f, path: path, direct: true}, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, err
	}
	return &OutputFile{f: f, path: path}, nil
}

// Write writes to the file.
func (o *OutputFile) Write(p []byte) (int, error) { return o.f.Write(p) }

// Commit makes the file durable and puts it in place.
func (o *OutputFile) Commit() error {
	if o.done {
		return errors.New("weights: output already committed or aborted")
	}
	o.done = true
	if o.direct {
		return o.f.Close()
	}
	if err := o.f.Sync(); err != nil {
		o.f.Close()
		os.Remove(o.f.Name())
		return err
	}
	if err := o.f.Close(); err != nil {
		os.Remove(o.f.Name())
		return err
	}
	if err := os.Rename(o.f.Name(), o.path); err != nil {
		os.Remove(o.f.Name())
		return err
	}
	return nil
}

// Abort discards the file unless it was committed; it is safe to defer.
func (o *OutputFile) Abort() {
	if o.done {
		return
	}
	o.done = true
	o.f.Close()
	if !o.direct {
		os.Remove(o.f.Name())
	}
}

// Write writes the next bytes of tensor data.
func (e *Encoder) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	if e.closed {
		return 0, errors.New("weights: write after Close")
	}
	n := 0
	for len(p) > 0 {
		if e.i >= len(e.tensors) {
			e.err = fmt.Errorf("weights: %d bytes more than the tensors hold", len(p))
			return n, e.err
		}
		k := int(min(int64(len(p)), e.left))
		m, err := e.w.Write(p[:k])
		n += m
		e.left -= int64(m)
		e.written += int64(m)
		if err != nil {
			e.err = err
			return n, err
		}
		p = p[k:]
		if e.left == 0 {
			e.endTensor()
			e.i++
			if e.i < len(e.tensors) {
				e.startTensor()
			}
		}
	}
	return n, e.err
}

// Close writes the end of the update and flushes. It fails if the tensors'
// data is incomplete.
func (e *Encoder) Close() error {
	if e.closed {
		return e.err
	}
	e.closed = true
	if e.err != nil {
		return e.err
	}
	if e.i < len(e.tensors) {
		e.err = fmt.Errorf("weights: tensor %d is missing %d bytes of data", e.i, e.left)
		return e.err
	}
	e.op(opAppends) // the outer list [num_samples, params]
	e.op(opTuple)
	e.put()
	e.op(opBuild)
	e.op(opStop)
	if e.err == nil {
		e.err = e.w.Flush()
	}
	return e.err
}

func (e *Encoder) op(c byte) {
	if e.err == nil {
		e.err = e.w.WriteByte(c)
	}
}

func (e *Encoder) raw(b []byte) {
	if e.err == nil {
		_, e.err = e.w.Write(b)
	}
}

func (e *Encoder) le(v uint64, n int) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	e.raw(b[:n])
}

// put memoizes the object just written and returns its index.
func (e *Encoder) put() uint32 {
	i := e.memo
	e.memo++
	if i < 256 {
		e.op(opBinPut)
		e.le(uint64(i), 1)
	} else {
		e.op(opLongBinPut)
		e.le(uint64(i), 4)
	}
	return i
}

func (e *Encoder) get(i uint32) {
	if i < 256 {
		e.op(opBinGet)
		e.le(uint64(i), 1)
	} else {
		e.op(opLongBinGet)
		e.le(uint64(i), 4)
	}
}

// int writes v as CPython's pickler does.
func (e *Encoder) int(v int64) {
	switch {
	case v >= 0 && v < 1<<8:
		e.op(opBinInt1)
		e.le(uint64(v), 1)
	case v >= 0 && v < 1<<16:
		e.op(opBinInt2)
		e.le(uint64(v), 2)
	case v >= math.MinInt32 && v <= math.MaxInt32:
		e.op(opBinInt)
		e.le(uint64(uint32(int32(v))), 4)
	default:
		// LONG1: the shortest little-endian two's complement.
		var b [8]byte
		binary.LittleEndian.PutUint64(b[:], uint64(v))
		n := 8
		for n > 1 {
			top, next := b[n-1], b[n-2]
			if (top == 0 && next&0x80 == 0) || (top == 0xff && next&0x80 != 0) {
				n--
				continue
			}
			break
		}
		e.op(opLong1)
		e.le(uint64(n), 1)
		e.raw(b[:n])
	}
}

func (e *Encoder) unicode(s string) {
	e.op(opBinUnicode)
	e.le(uint64(len(s)), 4)
	e.raw([]byte(s))
	e.put()
}

func (e *Encoder) global(mod, name string) {
	e.op(opGlobal)
	e.raw([]byte(mod + "\n" + name + "\n"))
	e.put()
}

// char writes a one-character string; CPython shares those, so a repeat
// is a memo get.
func (e *Encoder) char(c byte) {
	if i, ok := e.chars[c]; ok {
		e.get(i)
		return
	}
	e.op(opBinUnicode)
	e.le(1, 4)
	e.raw([]byte{c})
	e.chars[c] = e.memo
	e.put()
}

func (e *Encoder) bool(b bool) {
	if b {
		e.op(opNewTrue)
	} else {
		e.op(opNewFalse)
	}
}

// tuple writes a tuple of ints: EMPTY_TUPLE, TUPLE1-3, or MARK ... TUPLE.
func (e *Encoder) intTuple(vs []int) {
	if len(vs) == 0 {
		e.op(opEmptyTuple)
		return
	}
	if len(vs) > 3 {
		e.op(opMark)
	}
	for _, v := range vs {
		e.int(int64(v))
	}
	if len(vs) > 3 {
		e.op(opTuple)
	} else {
		e.op(opTuple1 + byte(len(vs)-1))
	}
	e.put()
}

// prologue writes the outer object array up to its first parameter.
func (e *Encoder) prologue(numSamples int64) {
	e.op(opProto)
	proto := uint64(3)
	for i := range e.tensors {
		if e.tensors[i].NBytes() > math.MaxUint32 {
			proto = 4 // BINBYTES8; numpy's protocol 3 cannot hold it at all
		}
	}
	e.le(proto, 1)
	e.global("numpy.core.multiarray", "_reconstruct") // 0
	e.global("numpy", "ndarray")                      // 1
	e.intTuple([]int{0})                              // 2
	e.op(opShortBinBytes)                             // b'b', 3
	e.le(1, 1)
	e.raw([]byte{'b'})
	e.put()
	e.op(opTuple3)
	e.put()
	e.op(opReduce)
	e.put()
	e.op(opMark)
	e.int(1)
	e.intTuple([]int{2})
	e.global("numpy", "dtype") // 7
	e.unicode("O8")
	e.bool(false)
	e.bool(true)
	e.op(opTuple3)
	e.put()
	e.op(opReduce)
	e.put()
	e.dtypeState('|', -1, -1, 63)
	e.op(opBuild)
	e.bool(false)
	e.op(opEmptyList)
	e.put()
	e.op(opMark)
	e.int(numSamples)
	e.op(opEmptyList)
	e.put()
}

func (e *Encoder) dtypeState(order byte, elsize, align, flags int64) {
	e.op(opMark)
	e.int(3)
	e.char(order)
	e.op(opNone)
	e.op(opNone)
	e.op(opNone)
	e.int(elsize)
	e.int(align)
	e.int(flags)
	e.op(opTuple)
	e.put()
}

func (e *Encoder) dtype(d DType) {
	shared := !d.BigEndian
	if i, ok := e.dtypes[d]; ok && shared {
		e.get(i)
		return
	}
	e.get(memoDTypeGlobal)
	elsize, align := int64(-1), int64(-1)
	if d.Kind == 'E' {
		e.global("ml_dtypes", "bfloat16")
		elsize, align = 2, 2
	} else {
		e.unicode(fmt.Sprintf("%c%d", d.Kind, d.Size))
	}
	e.bool(false)
	e.bool(true)
	e.op(opTuple3)
	e.put()
	e.op(opReduce)
	idx := e.put()
	if shared {
		e.dtypes[d] = idx
	}
	e.dtypeState(d.orderChar(), elsize, align, 0)
	e.op(opBuild)
}

// startTensor writes tensor e.i up to its data and the data's length.
func (e *Encoder) startTensor() {
	n := len(e.tensors)
	if n > 1 && e.i%pickleBatch == 0 {
		e.op(opMark)
	}
	t := &e.tensors[e.i]
	e.get(memoReconstruct)
	e.get(memoNDArray)
	e.intTuple([]int{0})
	e.get(memoCharB)
	e.op(opTuple3)
	e.put()
	e.op(opReduce)
	e.put()
	e.op(opMark)
	e.int(1)
	e.intTuple(t.Shape)
	e.dtype(t.DType)
	e.bool(t.Fortran)
	size := t.NBytes()
	e.left = size
	switch {
	case size == 0 && e.hasNil:
		e.get(e.empty)
	case size < 256:
		e.op(opShortBinBytes)
		e.le(uint64(size), 1)
	case size <= math.MaxUint32:
		e.op(opBinBytes)
		e.le(uint64(size), 4)
	default:
		e.op(opBinBytes8)
		e.le(uint64(size), 8)
	}
	if size == 0 {
		e.endTensor()
		e.i++
		if e.i < n {
			e.startTensor()
		}
	}
}

// endTensor writes what follows a tensor's data.
func (e *Encoder) endTensor() {
	t := &e.tensors[e.i]
	if t.NBytes() == 0 {
		if !e.hasNil {
			e.hasNil = true
			e.empty = e.put()
		}
	} else {
		e.put()
	}
	e.op(opTuple)
	e.put()
	e.op(opBuild)
	n := len(e.tensors)
	switch {
	case n == 1:
		e.op(opAppend)
	case (e.i+1)%pickleBatch == 0 || e.i == n-1:
		e.op(opAppends)
	}
}
