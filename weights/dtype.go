package weights

import (
	"encoding/binary"
	"fmt"
	"math"
	"strings"
	"sync"
)

// DType is the element type of a tensor: a kind, a size in bytes and a byte
// order.
type DType struct {
	// Kind is 'f' (IEEE float), 'i' (signed integer), 'u' (unsigned
	// integer), 'b' (boolean) or 'E' (bfloat16).
	Kind byte
	// Size is the number of bytes per element.
	Size int
	// BigEndian is set for big-endian ('>') multi-byte elements.
	BigEndian bool
}

// The element types a weights file can hold, little-endian.
var (
	Float16  = DType{Kind: 'f', Size: 2}
	Float32  = DType{Kind: 'f', Size: 4}
	Float64  = DType{Kind: 'f', Size: 8}
	BFloat16 = DType{Kind: 'E', Size: 2}
	Int8     = DType{Kind: 'i', Size: 1}
	Int16    = DType{Kind: 'i', Size: 2}
	Int32    = DType{Kind: 'i', Size: 4}
	Int64    = DType{Kind: 'i', Size: 8}
	Uint8    = DType{Kind: 'u', Size: 1}
	Uint16   = DType{Kind: 'u', Size: 2}
	Uint32   = DType{Kind: 'u', Size: 4}
	Uint64   = DType{Kind: 'u', Size: 8}
	Bool     = DType{Kind: 'b', Size: 1}
)

// Valid reports whether d is one of the supported element types.
func (d DType) Valid() bool {
	switch d.Kind {
	case 'f':
		return d.Size == 2 || d.Size == 4 || d.Size == 8
	case 'i', 'u':
		return d.Size == 1 || d.Size == 2 || d.Size == 4 || d.Size == 8
	case 'b':
		return d.Size == 1
	case 'E':
		return d.Size == 2
	}
	return false
}

// IsFloat reports whether d is a floating-point type (bfloat16 included).
func (d DType) IsFloat() bool { return d.Kind == 'f' || d.Kind == 'E' }

// Order returns the byte order of d's elements.
func (d DType) Order() binary.ByteOrder {
	if d.BigEndian {
		return binary.BigEndian
	}
	return binary.LittleEndian
}

// Native returns d in little-endian byte order.
func (d DType) Native() DType {
	d.BigEndian = false
	return d
}

// orderChar is numpy's byte-order character for d: '|' when order does not
// apply, '<' or '>' otherwise.
func (d DType) orderChar() byte {
	switch {
	case d.Size == 1:
		return '|'
	case d.BigEndian:
		return '>'
	}
	return '<'
}

// String returns numpy's dtype.str for d ("<f4", ">f8", "|u1"), or
// "bfloat16" (">bfloat16" big-endian).
func (d DType) String() string {
	if d.Kind == 'E' {
		if d.BigEndian {
			return ">bfloat16"
		}
		return "bfloat16"
	}
	return fmt.Sprintf("%c%c%d", d.orderChar(), d.Kind, d.Size)
}

// Name returns numpy's dtype.name for d ("float32", "int64", "bool").
func (d DType) Name() string {
	switch d.Kind {
	case 'f':
		return fmt.Sprintf("float%d", 8*d.Size)
	case 'i':
		return fmt.Sprintf("int%d", 8*d.Size)
	case 'u':
		return fmt.Sprintf("uint%d", 8*d.Size)
	case 'b':
		return "bool"
	case 'E':
		return "bfloat16"
	}
	return fmt.Sprintf("kind%q%d", d.Kind, d.Size)
}

// ParseDType parses a numpy type string ("<f4", ">i8", "|b1", "f2") or name
// ("float32", "bfloat16", "int64").
func ParseDType(s string) (DType, error) {
	names := map[string]DType{
		"float16": Float16, "float32": Float32, "float64": Float64, "bfloat16": BFloat16,
		"int8": Int8, "int16": Int16, "int32": Int32, "int64": Int64,
		"uint8": Uint8, "uint16": Uint16, "uint32": Uint32, "uint64": Uint64, "bool": Bool,
	}
	if d, ok := names[s]; ok {
		return d, nil
	}
	if strings.HasPrefix(s, ">") || strings.HasPrefix(s, "<") {
		if d, ok := names[s[1:]]; ok {
			d.BigEndian = s[0] == '>' && d.Size > 1
			return d, nil
		}
	}
	d, ok := parseTypeStr(s)
	if !ok {
		return DType{}, fmt.Errorf("unsupported dtype %q", s)
	}
	return d, nil
}

// parseTypeStr parses "[<>|=]?<kind><size>".
func parseTypeStr(s string) (DType, bool) {
	var d DType
	if s != "" && strings.IndexByte("<>|=", s[0]) >= 0 {
		d.BigEndian = s[0] == '>'
		s = s[1:]
	}
	if len(s) < 2 {
		return DType{}, false
	}
	d.Kind = s[0]
	if d.Kind == '?' {
		d.Kind = 'b'
	}
	n := 0
	for _, c := range s[1:] {
		if c < '0' || c > '9' || n > 64 {
			return DType{}, false
		}
		n = n*10 + int(c-'0')
	}
	d.Size = n
	if d.Size == 1 {
		d.BigEndian = false
	}
	return d, d.Valid() && d.Kind != 'E'
}

// NonFinite returns the index of the first NaN or infinite element of b,
// which holds elements of type d, or -1 if there is none (always -1 for
// integer types).
func (d DType) NonFinite(b []byte) int {
	// The loops are split by byte order so that each element costs one
	// inlined load, not an interface call: uploads are checked at line rate.
	le, be := binary.LittleEndian, binary.BigEndian
	switch {
	case d.Kind == 'f' && d.Size == 4 && !d.BigEndian:
		// Two floats per 64-bit word: a lane is NaN or Inf when its
		// exponent bits are all ones, that is when (x & e) ^ e has a zero
		// lane, which the borrow of a subtraction finds for both at once.
		const e = 0x7f8000007f800000
		i := 0
		for ; i+32 <= len(b); i += 32 {
			y0 := le.Uint64(b[i:])&e ^ e
			y1 := le.Uint64(b[i+8:])&e ^ e
			y2 := le.Uint64(b[i+16:])&e ^ e
			y3 := le.Uint64(b[i+24:])&e ^ e
			const one, high = 0x0000000100000001, 0x8000000080000000
			if ((y0-one)&^y0|(y1-one)&^y1|(y2-one)&^y2|(y3-one)&^y3)&high != 0 {
				break // find which element below
			}
		}
		for ; i+4 <= len(b); i += 4 {
			if le.Uint32(b[i:])&0x7f800000 == 0x7f800000 {
				return i / 4
			}
		}
	case d.Kind == 'f' && d.Size == 4:
		for i := 0; i+4 <= len(b); i += 4 {
			if be.Uint32(b[i:])&0x7f800000 == 0x7f800000 {
				return i / 4
			}
		}
	case d.Kind == 'f' && d.Size == 8:
		o := d.Order()
		for i := 0; i+8 <= len(b); i += 8 {
			if o.Uint64(b[i:])&0x7ff0000000000000 == 0x7ff0000000000000 {
				return i / 8
			}
		}
	case d.Kind == 'f' && d.Size == 2:
		o := d.Order()
		for i := 0; i+2 <= len(b); i += 2 {
			if o.Uint16(b[i:])&0x7c00 == 0x7c00 {
				return i / 2
			}
		}
	case d.Kind == 'E':
		o := d.Order()
		for i := 0; i+2 <= len(b); i += 2 {
			if o.Uint16(b[i:])&0x7f80 == 0x7f80 {
				return i / 2
			}
		}
	}
	return -1
}

// ToFloat64 converts len(dst) elements of type d from src into dst. src must
// hold at least len(dst)*d.Size bytes.
func (d DType) ToFloat64(dst []float64, src []byte) {
	n := len(dst)
	src = src[:n*d.Size]
	le := !d.BigEndian
	switch {
	case d.Kind == 'f' && d.Size == 4 && le:
		for i := range dst {
			dst[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(src[4*i:])))
		}
	case d.Kind == 'f' && d.Size == 8 && le:
		for i := range dst {
			dst[i] = math.Float64frombits(binary.LittleEndian.Uint64(src[8*i:]))
		}
	case d.Kind == 'f' && d.Size == 2:
		t := f16Table()
		o := d.Order()
		for i := range dst {
			dst[i] = float64(t[o.Uint16(src[2*i:])])
		}
	case d.Kind == 'E':
		o := d.Order()
		for i := range dst {
			dst[i] = float64(math.Float32frombits(uint32(o.Uint16(src[2*i:])) << 16))
		}
	case d.Kind == 'f' && d.Size == 4:
		for i := range dst {
			dst[i] = float64(math.Float32frombits(binary.BigEndian.Uint32(src[4*i:])))
		}
	case d.Kind == 'f' && d.Size == 8:
		for i := range dst {
			dst[i] = math.Float64frombits(binary.BigEndian.Uint64(src[8*i:]))
		}
	case d.Kind == 'i' || d.Kind == 'u' || d.Kind == 'b':
		o := d.Order()
		for i := range dst {
			dst[i] = d.intAt(o, src[i*d.Size:])
		}
	default:
		panic("weights: ToFloat64 of unsupported dtype " + d.String())
	}
}

func (d DType) intAt(o binary.ByteOrder, b []byte) float64 {
	signed := d.Kind == 'i'
	switch d.Size {
	case 1:
		if signed {
			return float64(int8(b[0]))
		}
		return float64(b[0])
	case 2:
		if signed {
			return float64(int16(o.Uint16(b)))
		}
		return float64(o.Uint16(b))
	case 4:
		if signed {
			return float64(int32(o.Uint32(b)))
		}
		return float64(o.Uint32(b))
	default:
		if signed {
			return float64(int64(o.Uint64(b)))
		}
		return float64(o.Uint64(b))
	}
}

// FromFloat64 converts src into elements of type d in dst, which must hold
// at least len(src)*d.Size bytes. Floats round to nearest even; integers
// round to the nearest integer (halves to even, as numpy's rint) and
// saturate at the type's range; booleans are 1 for values >= 0.5.
func (d DType) FromFloat64(dst []byte, src []float64) {
	dst = dst[:len(src)*d.Size]
	le := !d.BigEndian
	switch {
	case d.Kind == 'f' && d.Size == 4 && le:
		for i, v := range src {
			binary.LittleEndian.PutUint32(dst[4*i:], math.Float32bits(float32(v)))
		}
	case d.Kind == 'f' && d.Size == 8 && le:
		for i, v := range src {
			binary.LittleEndian.PutUint64(dst[8*i:], math.Float64bits(v))
		}
	case d.Kind == 'f' && d.Size == 4:
		for i, v := range src {
			binary.BigEndian.PutUint32(dst[4*i:], math.Float32bits(float32(v)))
		}
	case d.Kind == 'f' && d.Size == 8:
		for i, v := range src {
			binary.BigEndian.PutUint64(dst[8*i:], math.Float64bits(v))
		}
	case d.Kind == 'f' && d.Size == 2:
		o := d.Order()
		for i, v := range src {
			o.PutUint16(dst[2*i:], Float16Bits(v))
		}
	case d.Kind == 'E':
		o := d.Order()
		for i, v := range src {
			o.PutUint16(dst[2*i:], BFloat16Bits(v))
		}
	case d.Kind == 'b':
		for i, v := range src {
			dst[i] = 0
			if v >= 0.5 {
				dst[i] = 1
			}
		}
	case d.Kind == 'i' || d.Kind == 'u':
		o := d.Order()
		for i, v := range src {
			d.putInt(o, dst[i*d.Size:], v)
		}
	default:
		panic("weights: FromFloat64 to unsupported dtype " + d.String())
	}
}

func (d DType) putInt(o binary.ByteOrder, b []byte, v float64) {
	v = math.RoundToEven(v)
	bits := uint(8 * d.Size)
	var u uint64
	if d.Kind == 'i' {
		lo, hi := -math.Ldexp(1, int(bits)-1), math.Ldexp(1, int(bits)-1)
		var x int64
		switch {
		case v != v:
			x = 0
		case v <= lo:
			x = int64(-1) << (bits - 1)
		case v >= hi:
			x = int64(uint64(1)<<(bits-1) - 1)
		default:
			x = int64(v)
		}
		u = uint64(x)
	} else {
		hi := math.Ldexp(1, int(bits))
		switch {
		case v != v || v <= 0:
			u = 0
		case v >= hi:
			u = ^uint64(0) >> (64 - bits)
		default:
			u = uint64(v)
		}
	}
	switch d.Size {
	case 1:
		b[0] = byte(u)
	case 2:
		o.PutUint16(b, uint16(u))
	case 4:
		o.PutUint32(b, uint32(u))
	default:
		o.PutUint64(b, u)
	}
}

var (
	f16Once sync.Once
	f16Tab  *[1 << 16]float32
)

// f16Table returns the float32 value of every float16 bit pattern.
func f16Table() *[1 << 16]float32 {
	f16Once.Do(func() {
		t := new([1 << 16]float32)
		for i := range t {
			t[i] = float32(Float16Value(uint16(i)))
		}
		f16Tab = t
	})
	return f16Tab
}

// Float16Value returns the value of the IEEE 754 half-precision number with
// bits h.
func Float16Value(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	exp := int(h>>10) & 0x1f
	frac := float64(h & 0x3ff)
	switch exp {
	case 0:
		return sign * math.Ldexp(frac, -24)
	case 0x1f:
		if frac != 0 {
			return math.NaN()
		}
		return math.Inf(int(sign))
	}
	return sign * math.Ldexp(frac+1024, exp-25)
}

// Float16Bits returns the half-precision bits nearest to v (ties to even),
// infinity past the largest finite half.
func Float16Bits(v float64) uint16 { return uint16(roundBits(v, 5, 10)) }

// BFloat16Bits returns the bfloat16 bits nearest to v (ties to even).
func BFloat16Bits(v float64) uint16 { return uint16(roundBits(v, 8, 7)) }

// roundBits rounds v, correctly and once, to a binary floating-point format
// with expBits exponent bits and mantBits mantissa bits, and returns its bit
// pattern (sign in bit expBits+mantBits).
func roundBits(v float64, expBits, mantBits uint) uint64 {
	b := math.Float64bits(v)
	sign := (b >> 63) << (expBits + mantBits)
	exp := int(b>>52) & 0x7ff
	mant := b & (1<<52 - 1)
	maxExp := uint64(1)<<expBits - 1
	if exp == 0x7ff {
		if mant != 0 {
			return sign | maxExp<<mantBits | 1<<(mantBits-1) // quiet NaN
		}
		return sign | maxExp<<mantBits
	}
	if exp == 0 { // float64 subnormals are far below any target's range
		return sign
	}
	bias := int(1)<<(expBits-1) - 1
	e := exp - 1023 + bias // biased target exponent
	if e >= int(maxExp) {
		return sign | maxExp<<mantBits
	}
	m := mant | 1<<52 // with the implicit bit
	var q uint64
	var shift uint
	if e <= 0 {
		// Subnormal in the target: value = q * 2^(1-bias-mantBits).
		s := 52 - int(mantBits) + 1 - e
		if s > 53 {
			return sign // below half the smallest subnormal
		}
		shift = uint(s)
		q = m >> shift
	} else {
		shift = 52 - mantBits
		q = uint64(e)<<mantBits | (mant >> shift)
	}
	rem := m & (1<<shift - 1)
	half := uint64(1) << (shift - 1)
	if rem > half || (rem == half && q&1 == 1) {
		q++ // a carry into the exponent is the right answer, up to infinity
	}
	return sign | q
}
