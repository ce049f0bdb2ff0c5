package weights

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// Limits of the unpickler. A numpy update pickle needs a stack of a few
// dozen items, a memo of a few per tensor and 32 (numpy 1) or 64 (numpy 2)
// dimensions at most; the bounds are far above that and far below anything
// that could exhaust memory.
const (
	maxDims    = 64
	maxStack   = 1 << 20
	maxMarks   = 64
	maxMemo    = 1 << 22
	maxTensors = 1 << 20
	maxString  = 1 << 10
	// maxLooseBytes bounds a bytes object that is not an array's data;
	// numpy only writes the one-byte b'b' there.
	maxLooseBytes = 64
)

// mode is what the decoder does with tensor bytes.
type mode int

const (
	modeDecode mode = iota // copy them into Tensor.Data
	modeIndex              // record their offset, skip them
	modeScan               // pass them to a callback, keep none
)

// Decode reads a whole update from r, materializing every tensor's bytes.
// Allocations grow with the bytes actually received, so a false length
// claim in a short stream costs nothing. When r is an *os.File or another
// io.ReaderAt with a known size, ReadFile or DecodeAt are faster.
func Decode(r io.Reader) (*Update, error) {
	return newDecoder(r, -1, modeDecode).decode()
}

// DecodeAt reads a whole update of size bytes from r, allocating each
// tensor's bytes exactly once and reading them straight into place.
func DecodeAt(r io.ReaderAt, size int64) (*Update, error) {
	return newDecoder(io.NewSectionReader(r, 0, size), size, modeDecode).decode()
}

// ReadFile decodes the update in the named file, materializing its tensors.
// Errors name the file.
func ReadFile(path string) (*Update, error) { return readFile(path, DecodeAt) }

// readFile runs read on the named file and its size; errors name the file.
func readFile(path string, read func(io.ReaderAt, int64) (*Update, error)) (*Update, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	u, err := read(f, fi.Size())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return u, nil
}

// Index reads the structure of the update of size bytes in r and records
// where each tensor's bytes lie (Tensor.Offset; the length is NBytes)
// without reading them. Its cost does not depend on the tensors' sizes.
func Index(r io.ReaderAt, size int64) (*Update, error) {
	return newDecoder(io.NewSectionReader(r, 0, size), size, modeIndex).decode()
}

// IndexFile indexes the named file. Errors name the file.
func IndexFile(path string) (*Update, error) { return readFile(path, Index) }

// Visitor receives one tensor's bytes during Scan, in order, in chunks that
// hold whole elements. i is the tensor's index in the file; t has its dtype,
// shape, order and offset, but no Data.
type Visitor func(i int, t *Tensor, chunk []byte) error

// Scan reads an update from a stream in one pass, keeping no tensor bytes:
// each tensor's bytes go to visit (which may be nil) as they arrive. It is
// how an upload is validated while it is written to storage. An error from
// visit stops the scan and is returned.
func Scan(r io.Reader, visit Visitor) (*Update, error) {
	d := newDecoder(r, -1, modeScan)
	d.visit = visit
	return d.decode()
}

// global is one of the names a weights pickle may use.
type global int

const (
	gReconstruct global = iota + 1
	gNDArray
	gDType
	gBFloat16
)

func (g global) String() string {
	return [...]string{"", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "ml_dtypes.bfloat16"}[g]
}

// allowedGlobals are the only globals accepted, as "module\nname".
var allowedGlobals = map[string]global{
	"numpy.core.multiarray\n_reconstruct":  gReconstruct,
	"numpy._core.multiarray\n_reconstruct": gReconstruct,
	"numpy\nndarray":                       gNDArray,
	"numpy\ndtype":                         gDType,
	"ml_dtypes\nbfloat16":                  gBFloat16,
}

type (
	mark     struct{}
	none     struct{}
	tuple    []any
	list     struct{ items []any }
	bytesObj struct {
		off   int64
		n     int64
		data  []byte // nil unless materialized
		isArr bool   // array data, read where numpy puts it
		tidx  int
		used  bool
		// what the data was read as, when isArr
		dt      *dtypeObj
		shape   []int
		fortran bool
	}
	dtypeObj struct {
		dt     DType
		object bool
		built  bool
	}
	arrayObj struct {
		built   bool
		object  bool
		t       Tensor
		objects []any
		tidx    int
	}
)

type decoder struct {
	in     *input
	mode   mode
	visit  Visitor
	stack  []any
	marks  []int
	memo   map[uint32]any
	tidx   int // tensors whose data were seen
	op     string
	opAt   int64
	header *npyHeader
}

func newDecoder(r io.Reader, size int64, m mode) *decoder {
	return &decoder{in: newInput(r, size), mode: m, memo: map[uint32]any{}}
}

func (d *decoder) errAt(off int64, op string, format string, args ...any) *Error {
	return &Error{Offset: off, Op: op, Tensor: -1, Msg: fmt.Sprintf(format, args...)}
}

// fail reports a problem with the opcode being read.
func (d *decoder) fail(format string, args ...any) *Error {
	return d.errAt(d.opAt, d.op, format, args...)
}

func (d *decoder) failTensor(i int, format string, args ...any) *Error {
	e := d.fail(format, args...)
	e.Tensor = i
	return e
}

// wrap turns an input error into a decoder error for the current opcode.
func (d *decoder) wrap(err error) error {
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	if errors.Is(err, ErrTruncated) {
		return d.fail("%v", err)
	}
	return d.fail("read: %v", err)
}

func (d *decoder) decode() (*Update, error) {
	h, err := d.readHeader()
	if err != nil {
		return nil, err
	}
	d.header = h
	if h.descr != "|O" && h.descr != "|O8" && h.descr != "O" {
		return nil, d.errAt(8, "", "not an update: the npy array has dtype %s and shape %s; an update is a (2,) object array (num_samples, [params])", h.descr, FormatShape(h.shape))
	}
	if len(h.shape) != 1 || h.shape[0] != 2 {
		return nil, d.errAt(8, "", "not an update: an object array of shape %s; an update has shape (2,): (num_samples, [params])", FormatShape(h.shape))
	}
	top, err := d.unpickle()
	if err != nil {
		return nil, err
	}
	if rem := d.in.remaining(); rem > 0 {
		return nil, d.errAt(d.in.pos, "", "%d bytes after the end of the pickle", rem)
	} else if rem < 0 {
		if err := d.in.fill(1); err == nil {
			return nil, d.errAt(d.in.pos, "", "bytes after the end of the pickle")
		} else if !errors.Is(err, ErrTruncated) {
			return nil, d.errAt(d.in.pos, "", "read: %v", err)
		}
	}
	u, err := d.update(top)
	if err != nil {
		return nil, err
	}
	u.Size = d.in.pos
	return u, nil
}

// update checks that the unpickled object is an update and returns it.
func (d *decoder) update(top any) (*Update, error) {
	end := func(format string, args ...any) error {
		return d.errAt(d.in.pos, "", format, args...)
	}
	arr, ok := top.(*arrayObj)
	if !ok || !arr.built {
		return nil, end("the pickle holds %s, not a numpy object array", describe(top))
	}
	if !arr.object {
		return nil, end("the pickle holds a %s array, not an object array (num_samples, [params])", arr.t.DType)
	}
	if len(arr.objects) != 2 || len(arr.t.Shape) != 1 {
		return nil, end("the object array has shape %s; an update has shape (2,): (num_samples, [params])", FormatShape(arr.t.Shape))
	}
	u := &Update{}
	switch n := arr.objects[0].(type) {
	case int64:
		if n <= 0 {
			return nil, end("num_samples is %d; it must be positive", n)
		}
		u.NumSamples = n
	case float64:
		return nil, end("num_samples is %v, a float; it must be a positive int", n)
	default:
		return nil, end("num_samples is %s; it must be a positive int", describe(n))
	}
	params, ok := arr.objects[1].(*list)
	if !ok {
		return nil, end("the second element is %s; it must be a list of arrays", describe(arr.objects[1]))
	}
	if len(params.items) == 0 {
		return nil, end("the parameter list is empty; it must hold at least one array")
	}
	u.Tensors = make([]Tensor, len(params.items))
	for i, it := range params.items {
		a, ok := it.(*arrayObj)
		if !ok || !a.built {
			return nil, &Error{Offset: d.in.pos, Tensor: i, Msg: fmt.Sprintf("parameter %d is %s, not an ndarray", i, describe(it))}
		}
		if a.object {
			return nil, &Error{Offset: d.in.pos, Tensor: i, Msg: fmt.Sprintf("parameter %d has dtype object; parameters must be numeric arrays", i)}
		}
		u.Tensors[i] = a.t
	}
	return u, nil
}

// describe names a value's Python type for error messages.
func describe(v any) string {
	switch x := v.(type) {
	case nil, none:
		return "None"
	case int64:
		return "an int"
	case float64:
		return "a float"
	case bool:
		return "a bool"
	case string:
		return fmt.Sprintf("a str (%q)", x)
	case *bytesObj:
		return "a bytes object"
	case tuple:
		return "a tuple"
	case *list:
		return "a list"
	case global:
		return x.String()
	case *dtypeObj:
		return "a numpy dtype"
	case *arrayObj:
		if x.object {
			return "an object array"
		}
		return "an ndarray"
	case mark:
		return "a MARK"
	}
	return fmt.Sprintf("%T", v)
}

// Pickle opcodes this unpickler knows.
const (
	opMark           = '('
	opStop           = '.'
	opPop            = '0'
	opBinInt         = 'J'
	opBinInt1        = 'K'
	opBinInt2        = 'M'
	opNone           = 'N'
	opBinUnicode     = 'X'
	opAppend         = 'a'
	opBuild          = 'b'
	opGlobal         = 'c'
	opAppends        = 'e'
	opBinGet         = 'h'
	opLongBinGet     = 'j'
	opList           = 'l'
	opEmptyList      = ']'
	opBinPut         = 'q'
	opLongBinPut     = 'r'
	opReduce         = 'R'
	opTuple          = 't'
	opEmptyTuple     = ')'
	opBinFloat       = 'G'
	opProto          = 0x80
	opTuple1         = 0x85
	opTuple2         = 0x86
	opTuple3         = 0x87
	opNewTrue        = 0x88
	opNewFalse       = 0x89
	opLong1          = 0x8a
	opLong4          = 0x8b
	opBinBytes       = 'B'
	opShortBinBytes  = 'C'
	opShortBinUni    = 0x8c
	opBinUnicode8    = 0x8d
	opBinBytes8      = 0x8e
	opStackGlobal    = 0x93
	opMemoize        = 0x94
	opFrame          = 0x95
	opEmptyDict      = '}'
	opShortBinString = 'U'
)

var opNames = map[byte]string{
	opMark: "MARK", opStop: "STOP", opPop: "POP", opBinInt: "BININT", opBinInt1: "BININT1",
	opBinInt2: "BININT2", opNone: "NONE", opBinUnicode: "BINUNICODE", opAppend: "APPEND",
	opBuild: "BUILD", opGlobal: "GLOBAL", opAppends: "APPENDS", opBinGet: "BINGET",
	opLongBinGet: "LONG_BINGET", opList: "LIST", opEmptyList: "EMPTY_LIST", opBinPut: "BINPUT",
	opLongBinPut: "LONG_BINPUT", opReduce: "REDUCE", opTuple: "TUPLE", opEmptyTuple: "EMPTY_TUPLE",
	opBinFloat: "BINFLOAT", opProto: "PROTO", opTuple1: "TUPLE1", opTuple2: "TUPLE2",
	opTuple3: "TUPLE3", opNewTrue: "NEWTRUE", opNewFalse: "NEWFALSE", opLong1: "LONG1",
	opLong4: "LONG4", opBinBytes: "BINBYTES", opShortBinBytes: "SHORT_BINBYTES",
	opShortBinUni: "SHORT_BINUNICODE", opBinUnicode8: "BINUNICODE8", opBinBytes8: "BINBYTES8",
	opStackGlobal: "STACK_GLOBAL", opMemoize: "MEMOIZE", opFrame: "FRAME",
}

func opName(c byte) string {
	if n, ok := opNames[c]; ok {
		return n
	}
	if c >= 0x20 && c < 0x7f {
		return fmt.Sprintf("0x%02x (%q)", c, c)
	}
	return fmt.Sprintf("0x%02x", c)
}

func (d *decoder) push(v any) error {
	if len(d.stack) >= maxStack {
		return d.fail("stack deeper than %d items", maxStack)
	}
	d.stack = append(d.stack, v)
	return nil
}

func (d *decoder) pop() (any, error) {
	n := len(d.stack)
	if n == 0 || (len(d.marks) > 0 && d.marks[len(d.marks)-1] == n) {
		return nil, d.fail("stack underflow")
	}
	v := d.stack[n-1]
	d.stack = d.stack[:n-1]
	return v, nil
}

// popMark pops everything above the last MARK.
func (d *decoder) popMark() ([]any, error) {
	if len(d.marks) == 0 {
		return nil, d.fail("no MARK on the stack")
	}
	k := d.marks[len(d.marks)-1]
	d.marks = d.marks[:len(d.marks)-1]
	items := d.stack[k:]
	d.stack = d.stack[:k]
	return items, nil
}

// sinceMark returns the items above the last MARK without popping them.
func (d *decoder) sinceMark() []any {
	if len(d.marks) == 0 {
		return nil
	}
	return d.stack[d.marks[len(d.marks)-1]:]
}

func (d *decoder) le(n int) (uint64, error) {
	b, err := d.in.next(n)
	if err != nil {
		return 0, d.wrap(err)
	}
	var v uint64
	for i := n - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v, nil
}

func (d *decoder) memoPut(idx uint32) error {
	if len(d.stack) == 0 || (len(d.marks) > 0 && d.marks[len(d.marks)-1] == len(d.stack)) {
		return d.fail("memo store with an empty stack")
	}
	if _, ok := d.memo[idx]; !ok && len(d.memo) >= maxMemo {
		return d.fail("more than %d memo entries", maxMemo)
	}
	d.memo[idx] = d.stack[len(d.stack)-1]
	return nil
}

func (d *decoder) memoGet(idx uint32) error {
	v, ok := d.memo[idx]
	if !ok {
		return d.fail("memo index %d was never stored", idx)
	}
	return d.push(v)
}

func (d *decoder) str(n uint64) error {
	if n > maxString {
		return d.fail("a string of %d bytes; a weights pickle holds only short names", n)
	}
	if err := d.in.check(int64(n)); err != nil {
		return d.wrap(err)
	}
	b, err := d.in.next(int(n))
	if err != nil {
		return d.wrap(err)
	}
	return d.push(string(b))
}

// argBytes is the size of the little-endian integer argument (a value, a
// length or a memo index) of the opcodes that carry one.
var argBytes = [256]int{
	opProto: 1, opFrame: 8, opBinInt1: 1, opBinInt2: 2, opBinInt: 4, opLong1: 1, opLong4: 4,
	opShortBinUni: 1, opBinUnicode: 4, opBinUnicode8: 8, opShortBinBytes: 1, opBinBytes: 4, opBinBytes8: 8,
	opBinPut: 1, opLongBinPut: 4, opBinGet: 1, opLongBinGet: 4,
}

func (d *decoder) unpickle() (any, error) {
	for {
		d.opAt = d.in.pos
		d.op = ""
		c, err := d.in.byte()
		if err != nil {
			return nil, d.errAt(d.opAt, "", "pickle stream ends early, before STOP: %v", err)
		}
		d.op = opName(c)
		var arg uint64
		if n := argBytes[c]; n > 0 {
			if arg, err = d.le(n); err != nil {
				return nil, err
			}
		}
		switch c {
		case opProto:
			if arg < 2 || arg > 5 {
				return nil, d.fail("pickle protocol %d is not supported (2 to 5 are)", arg)
			}
		case opFrame:
			// Frames only group opcodes; the bytes are read as they come.
		case opStop:
			if len(d.marks) > 0 {
				return nil, d.fail("STOP with an open MARK")
			}
			if len(d.stack) != 1 {
				return nil, d.fail("STOP with %d items on the stack, expected 1", len(d.stack))
			}
			return d.stack[0], nil
		case opMark:
			if len(d.marks) >= maxMarks {
				return nil, d.fail("MARKs nested deeper than %d", maxMarks)
			}
			d.marks = append(d.marks, len(d.stack))
		case opPop:
			_, err = d.pop()
		case opNone:
			err = d.push(none{})
		case opNewTrue:
			err = d.push(true)
		case opNewFalse:
			err = d.push(false)
		case opBinInt1, opBinInt2:
			err = d.push(int64(arg))
		case opBinInt:
			err = d.push(int64(int32(uint32(arg))))
		case opLong1:
			err = d.long1(int(arg))
		case opLong4:
			return nil, d.fail("an integer of %d bytes does not fit in 64 bits", arg)
		case opBinFloat:
			b, err := d.in.next(8)
			if err != nil {
				return nil, d.wrap(err)
			}
			if err := d.push(math.Float64frombits(binary.BigEndian.Uint64(b))); err != nil {
				return nil, err
			}
		case opShortBinUni, opBinUnicode, opBinUnicode8:
			err = d.str(arg)
		case opShortBinBytes, opBinBytes, opBinBytes8:
			if arg > math.MaxInt64 {
				return nil, d.fail("claims %d bytes", arg)
			}
			err = d.bytes(int64(arg))
		case opEmptyTuple:
			err = d.push(tuple{})
		case opTuple1, opTuple2, opTuple3:
			n := int(c-opTuple1) + 1
			t := make(tuple, n)
			for i := n - 1; i >= 0 && err == nil; i-- {
				t[i], err = d.pop()
			}
			if err == nil {
				err = d.push(t)
			}
		case opTuple:
			var items []any
			if items, err = d.popMark(); err == nil {
				err = d.push(append(tuple{}, items...))
			}
		case opEmptyList:
			err = d.push(&list{})
		case opList:
			var items []any
			if items, err = d.popMark(); err == nil {
				err = d.push(&list{items: append([]any{}, items...)})
			}
		case opAppend:
			var v any
			if v, err = d.pop(); err == nil {
				err = d.appendTo([]any{v})
			}
		case opAppends:
			var items []any
			if items, err = d.popMark(); err == nil {
				err = d.appendTo(items)
			}
		case opBinPut, opLongBinPut:
			err = d.memoPut(uint32(arg))
		case opMemoize:
			err = d.memoPut(uint32(len(d.memo)))
		case opBinGet, opLongBinGet:
			err = d.memoGet(uint32(arg))
		case opGlobal:
			var mod, name string
			if mod, err = d.line(); err == nil {
				if name, err = d.line(); err == nil {
					err = d.global(mod, name)
				}
			}
		case opStackGlobal:
			err = d.stackGlobal()
		case opReduce:
			err = d.reduce()
		case opBuild:
			err = d.build()
		default:
			return nil, d.fail("opcode not allowed in a weights file")
		}
		if err != nil {
			return nil, err
		}
	}
}

// long1 pushes the n-byte little-endian two's complement integer of LONG1.
func (d *decoder) long1(n int) error {
	if n > 8 {
		return d.fail("an integer of %d bytes does not fit in 64 bits", n)
	}
	var v int64
	if n > 0 {
		b, err := d.in.next(n)
		if err != nil {
			return d.wrap(err)
		}
		var u uint64
		for i := n - 1; i >= 0; i-- {
			u = u<<8 | uint64(b[i])
		}
		if b[n-1]&0x80 != 0 && n < 8 { // sign-extend
			u |= ^uint64(0) << (8 * n)
		}
		v = int64(u)
	}
	return d.push(v)
}

// stackGlobal is STACK_GLOBAL: GLOBAL with the names on the stack.
func (d *decoder) stackGlobal() error {
	nameV, err := d.pop()
	if err != nil {
		return err
	}
	modV, err := d.pop()
	if err != nil {
		return err
	}
	mod, ok1 := modV.(string)
	name, ok2 := nameV.(string)
	if !ok1 || !ok2 {
		return d.fail("STACK_GLOBAL needs two strings, got %s and %s", describe(modV), describe(nameV))
	}
	return d.global(mod, name)
}

// line reads a newline-terminated name of GLOBAL.
func (d *decoder) line() (string, error) {
	var b []byte
	for {
		c, err := d.in.byte()
		if err != nil {
			return "", d.wrap(err)
		}
		if c == '\n' {
			return string(b), nil
		}
		if len(b) >= 256 {
			return "", d.fail("a global name longer than 256 bytes")
		}
		b = append(b, c)
	}
}

func (d *decoder) global(mod, name string) error {
	g, ok := allowedGlobals[mod+"\n"+name]
	if !ok {
		return d.fail("global %s.%s is not allowed: a weights file may only name numpy's array rebuilders (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype); nothing was executed", mod, name)
	}
	return d.push(g)
}

func (d *decoder) appendTo(items []any) error {
	n := len(d.stack)
	if n == 0 || (len(d.marks) > 0 && d.marks[len(d.marks)-1] == n) {
		return d.fail("append with no list on the stack")
	}
	l, ok := d.stack[n-1].(*list)
	if !ok {
		return d.fail("append to %s, not a list", describe(d.stack[n-1]))
	}
	if len(l.items)+len(items) > maxTensors {
		return d.fail("a list of more than %d items", maxTensors)
	}
	l.items = append(l.items, items...)
	return nil
}

// bytes reads a bytes object of n bytes. When it sits where numpy puts an
// array's data, after (1, shape, dtype, fortran) in a BUILD state tuple, its
// length is checked against the shape at once and its bytes are handled as
// tensor data: copied, skipped or streamed to the visitor.
func (d *decoder) bytes(n int64) error {
	if err := d.in.check(n); err != nil {
		return d.wrap(err)
	}
	start := d.in.pos
	items := d.sinceMark()
	if len(items) == 4 {
		v, ok1 := items[0].(int64)
		shape, ok2 := items[1].(tuple)
		dt, ok3 := items[2].(*dtypeObj)
		fortran, ok4 := items[3].(bool)
		if ok1 && ok2 && ok3 && ok4 && v == 1 {
			return d.tensorData(start, n, shape, dt, fortran)
		}
	}
	if n > maxLooseBytes {
		return d.fail("a bytes object of %d bytes where numpy writes no array data", n)
	}
	b, err := d.in.read(n)
	if err != nil {
		return d.wrap(err)
	}
	return d.push(&bytesObj{off: start, n: n, data: b, tidx: -1})
}

func (d *decoder) tensorData(start, n int64, shapeT tuple, dt *dtypeObj, fortran bool) error {
	i := d.tidx
	if i >= maxTensors {
		return d.fail("more than %d tensors", maxTensors)
	}
	if dt.object || !dt.built {
		return d.failTensor(i, "array data as bytes for a dtype that is not numeric")
	}
	shape, count, err := d.shapeOf(shapeT, dt.dt.Size, i)
	if err != nil {
		return err
	}
	if want := count * int64(dt.dt.Size); want != n {
		return d.failTensor(i, "shape %s of %s needs %d bytes, the data has %d", FormatShape(shape), dt.dt, want, n)
	}
	d.tidx++
	obj := &bytesObj{off: start, n: n, isArr: true, tidx: i, dt: dt, shape: shape, fortran: fortran}
	switch d.mode {
	case modeDecode:
		b, err := d.in.read(n)
		if err != nil {
			return d.wrapTensor(i, err)
		}
		obj.data = b
	case modeIndex:
		if err := d.in.skip(n); err != nil {
			return d.wrapTensor(i, err)
		}
	case modeScan:
		t := &Tensor{DType: dt.dt, Shape: shape, Fortran: fortran, Offset: start}
		var fn func([]byte) error
		if d.visit != nil {
			fn = func(b []byte) error { return d.visit(i, t, b) }
		}
		if err := d.in.stream(n, dt.dt.Size, fn); err != nil {
			return d.wrapTensor(i, err)
		}
	}
	return d.push(obj)
}

func (d *decoder) wrapTensor(i int, err error) error {
	if e := AsError(err); e != nil {
		if e.Tensor < 0 {
			e.Tensor = i
		}
		return e
	}
	e := AsError(d.wrap(err))
	e.Tensor = i
	return e
}

// shapeOf checks a shape tuple and returns it with its element count, which
// cannot overflow: it is bounded by what elemSize-byte elements could fit in
// 2^62 bytes.
func (d *decoder) shapeOf(t tuple, elemSize int, tensor int) ([]int, int64, error) {
	if len(t) > maxDims {
		return nil, 0, d.failTensor(tensor, "%d dimensions; at most %d are allowed", len(t), maxDims)
	}
	shape := make([]int, len(t))
	count := int64(1)
	limit := int64(1) << 62 / int64(max(elemSize, 1))
	for k, v := range t {
		n, ok := v.(int64)
		if !ok || n < 0 {
			return nil, 0, d.failTensor(tensor, "dimension %d of the shape is %s, not a non-negative int", k, describe(v))
		}
		if n > 0 && count > limit/n {
			return nil, 0, d.failTensor(tensor, "shape %v claims more elements than any file could hold", t)
		}
		count *= n
		shape[k] = int(n)
	}
	return shape, count, nil
}

func (d *decoder) reduce() error {
	args, err := d.pop()
	if err != nil {
		return err
	}
	fn, err := d.pop()
	if err != nil {
		return err
	}
	g, ok := fn.(global)
	if !ok {
		return d.fail("REDUCE calls %s; only numpy's rebuilders may be called", describe(fn))
	}
	a, ok := args.(tuple)
	if !ok {
		return d.fail("REDUCE arguments are %s, not a tuple", describe(args))
	}
	switch g {
	case gReconstruct:
		// _reconstruct(numpy.ndarray, (0,), b'b'): an empty array BUILD fills.
		if len(a) != 3 || a[0] != gNDArray {
			return d.fail("_reconstruct must rebuild a numpy.ndarray, got arguments %s", describeTuple(a))
		}
		if _, ok := a[1].(tuple); !ok {
			return d.fail("_reconstruct's shape argument is %s, not a tuple", describe(a[1]))
		}
		if _, ok := a[2].(*bytesObj); !ok {
			return d.fail("_reconstruct's dtype argument is %s, not bytes", describe(a[2]))
		}
		return d.push(&arrayObj{tidx: -1})
	case gDType:
		// dtype('f4', False, True)
		if len(a) != 3 {
			return d.fail("numpy.dtype takes 3 arguments here, got %d", len(a))
		}
		if _, ok := a[1].(bool); !ok {
			return d.fail("numpy.dtype's align argument is %s, not a bool", describe(a[1]))
		}
		if _, ok := a[2].(bool); !ok {
			return d.fail("numpy.dtype's copy argument is %s, not a bool", describe(a[2]))
		}
		switch s := a[0].(type) {
		case global:
			if s != gBFloat16 {
				return d.fail("numpy.dtype of %s", s)
			}
			return d.push(&dtypeObj{dt: BFloat16})
		case string:
			if s == "O8" || s == "O4" || s == "O" {
				return d.push(&dtypeObj{object: true})
			}
			dt, ok := parseTypeStr(s)
			if !ok {
				return d.fail("dtype %q is not supported; weights may be float16/32/64, bfloat16, (u)int8-64 or bool", s)
			}
			return d.push(&dtypeObj{dt: dt})
		default:
			return d.fail("numpy.dtype of %s", describe(a[0]))
		}
	}
	return d.fail("REDUCE calls %s, which is not a rebuilder", g)
}

// tupleInts returns the ints of a shape tuple, -1 for anything else.
func tupleInts(t tuple) []int {
	s := make([]int, len(t))
	for i, v := range t {
		s[i] = -1
		if n, ok := v.(int64); ok && n >= 0 && n <= math.MaxInt {
			s[i] = int(n)
		}
	}
	return s
}

func describeTuple(t tuple) string {
	var b bytes.Buffer
	b.WriteByte('(')
	for i, v := range t {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(describe(v))
	}
	b.WriteByte(')')
	return b.String()
}

func (d *decoder) build() error {
	state, err := d.pop()
	if err != nil {
		return err
	}
	n := len(d.stack)
	if n == 0 || (len(d.marks) > 0 && d.marks[len(d.marks)-1] == n) {
		return d.fail("BUILD with nothing to build")
	}
	st, ok := state.(tuple)
	if !ok {
		return d.fail("BUILD state is %s, not a tuple", describe(state))
	}
	switch obj := d.stack[n-1].(type) {
	case *dtypeObj:
		return d.buildDType(obj, st)
	case *arrayObj:
		return d.buildArray(obj, st)
	}
	return d.fail("BUILD of %s; only arrays and dtypes are built", describe(d.stack[n-1]))
}

func (d *decoder) buildDType(obj *dtypeObj, st tuple) error {
	// (3, '<', None, None, None, -1, -1, 0): version, byte order, subarray,
	// names, fields, itemsize, alignment, flags.
	if obj.built {
		return d.fail("dtype built twice")
	}
	if len(st) != 8 {
		return d.fail("dtype state has %d items, expected 8", len(st))
	}
	if v, ok := st[0].(int64); !ok || v != 3 {
		return d.fail("dtype state version is %v, expected 3", st[0])
	}
	order, ok := st[1].(string)
	if !ok || len(order) != 1 {
		return d.fail("dtype byte order is %s, expected '<', '>' or '|'", describe(st[1]))
	}
	for k := 2; k < 5; k++ {
		if _, ok := st[k].(none); !ok {
			return d.fail("structured dtypes are not supported (state item %d is %s)", k, describe(st[k]))
		}
	}
	for k := 5; k < 8; k++ {
		if _, ok := st[k].(int64); !ok {
			return d.fail("dtype state item %d is %s, not an int", k, describe(st[k]))
		}
	}
	switch order {
	case "<", "|", "=":
		obj.dt.BigEndian = false
	case ">":
		obj.dt.BigEndian = obj.dt.Size > 1
	default:
		return d.fail("dtype byte order %q, expected '<', '>' or '|'", order)
	}
	obj.built = true
	return nil
}

func (d *decoder) buildArray(obj *arrayObj, st tuple) error {
	// (1, shape, dtype, is_fortran, data)
	if obj.built {
		return d.fail("array built twice")
	}
	if len(st) != 5 {
		return d.fail("array state has %d items, expected 5", len(st))
	}
	if v, ok := st[0].(int64); !ok || v != 1 {
		return d.fail("array state version is %s, expected 1", describe(st[0]))
	}
	shapeT, ok := st[1].(tuple)
	if !ok {
		return d.fail("array shape is %s, not a tuple", describe(st[1]))
	}
	dt, ok := st[2].(*dtypeObj)
	if !ok || !dt.built {
		return d.fail("array dtype is %s, not a numpy dtype", describe(st[2]))
	}
	fortran, ok := st[3].(bool)
	if !ok {
		return d.fail("array order flag is %s, not a bool", describe(st[3]))
	}
	if dt.object {
		items, ok := st[4].(*list)
		if !ok {
			return d.fail("object array data is %s, not a list", describe(st[4]))
		}
		shape, count, err := d.shapeOf(shapeT, 1, -1)
		if err != nil {
			return err
		}
		if count != int64(len(items.items)) {
			return d.fail("object array of shape %s holds %d items", FormatShape(shape), len(items.items))
		}
		obj.object, obj.built = true, true
		obj.t = Tensor{Shape: shape, Fortran: fortran}
		obj.objects = items.items
		return nil
	}
	data, ok := st[4].(*bytesObj)
	if !ok {
		return d.fail("array data is %s, not bytes", describe(st[4]))
	}
	i := data.tidx
	if data.n == 0 && data.used {
		// numpy shares the empty bytes object between empty arrays.
		i = d.tidx
		d.tidx++
	} else if data.isArr {
		// The visitor saw these bytes as (dtype, shape, order): the array
		// must be built as exactly that.
		if data.dt != dt || data.fortran != fortran || FormatShape(data.shape) != FormatShape(tupleInts(shapeT)) {
			return d.failTensor(i, "array state does not match the dtype, shape and order its data was read with")
		}
	} else {
		// Data in an unusual place (a small array): check it now.
		i = d.tidx
		d.tidx++
		if i >= maxTensors {
			return d.fail("more than %d tensors", maxTensors)
		}
	}
	shape, count, err := d.shapeOf(shapeT, dt.dt.Size, i)
	if err != nil {
		return err
	}
	if want := count * int64(dt.dt.Size); want != data.n {
		return d.failTensor(i, "shape %s of %s needs %d bytes, the data has %d", FormatShape(shape), dt.dt, want, data.n)
	}
	if data.used && data.n > 0 {
		return d.failTensor(i, "array data shared with another array")
	}
	data.used = true
	obj.built = true
	obj.tidx = i
	obj.t = Tensor{DType: dt.dt, Shape: shape, Fortran: fortran, Offset: data.off}
	switch d.mode {
	case modeDecode:
		obj.t.Data = data.data
		if obj.t.Data == nil {
			obj.t.Data = []byte{}
		}
	case modeScan:
		if !data.isArr && d.visit != nil && data.n > 0 {
			if err := d.visit(i, &obj.t, data.data); err != nil {
				return err
			}
		}
	}
	return nil
}
