package weights

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
)

const (
	npyMagic = "\x93NUMPY"
	// maxHeaderLen bounds the npy header; numpy's own loader refuses more
	// than 10000 bytes by default.
	maxHeaderLen = 1 << 16
	// arrayAlign and growthAxisMaxDigits are numpy's header padding rules
	// (numpy/lib/format.py).
	arrayAlign          = 64
	growthAxisMaxDigits = 21
)

// npyHeader is the part of an .npy header we read.
type npyHeader struct {
	major, minor byte
	descr        string
	fortran      bool
	shape        []int
}

// readHeader reads the magic, version and header dict.
func (d *decoder) readHeader() (*npyHeader, error) {
	pre, err := d.in.next(8)
	if err != nil {
		return nil, d.errAt(0, "", "not an npy file: %v", err)
	}
	if string(pre[:6]) != npyMagic {
		return nil, d.errAt(0, "", "not an npy file: the magic string is %q, expected %q", pre[:6], npyMagic)
	}
	h := &npyHeader{major: pre[6], minor: pre[7]}
	var n int64
	switch h.major {
	case 1:
		b, err := d.in.next(2)
		if err != nil {
			return nil, d.errAt(8, "", "npy header length: %v", err)
		}
		n = int64(binary.LittleEndian.Uint16(b))
	case 2, 3:
		b, err := d.in.next(4)
		if err != nil {
			return nil, d.errAt(8, "", "npy header length: %v", err)
		}
		n = int64(binary.LittleEndian.Uint32(b))
	default:
		return nil, d.errAt(6, "", "unsupported npy format version %d.%d (1.0, 2.0 and 3.0 are)", h.major, h.minor)
	}
	if h.minor != 0 {
		return nil, d.errAt(6, "", "unsupported npy format version %d.%d (1.0, 2.0 and 3.0 are)", h.major, h.minor)
	}
	if n > maxHeaderLen {
		return nil, d.errAt(8, "", "npy header claims %d bytes, more than the %d allowed", n, maxHeaderLen)
	}
	start := d.in.pos
	b, err := d.in.next(int(n))
	if err != nil {
		return nil, d.errAt(start, "", "npy header: %v", err)
	}
	if err := parseHeaderDict(h, b); err != nil {
		return nil, d.errAt(start, "", "npy header %q: %v", strings.TrimRight(string(b), " \n"), err)
	}
	return h, nil
}

// parseHeaderDict parses numpy's header, a Python dict literal such as
// {'descr': '|O', 'fortran_order': False, 'shape': (2,), }.
func parseHeaderDict(h *npyHeader, b []byte) error {
	p := &litParser{s: string(bytes.TrimRight(b, " \n\x00"))}
	if !p.eat('{') {
		return fmt.Errorf("does not start with '{'")
	}
	seen := map[string]bool{}
	for {
		if p.eat('}') {
			break
		}
		key, err := p.str()
		if err != nil {
			return fmt.Errorf("key: %w", err)
		}
		if !p.eat(':') {
			return fmt.Errorf("missing ':' after %q", key)
		}
		switch key {
		case "descr":
			if h.descr, err = p.str(); err != nil {
				return fmt.Errorf("descr: %w", err)
			}
		case "fortran_order":
			if h.fortran, err = p.boolean(); err != nil {
				return fmt.Errorf("fortran_order: %w", err)
			}
		case "shape":
			if h.shape, err = p.intTuple(); err != nil {
				return fmt.Errorf("shape: %w", err)
			}
		default:
			return fmt.Errorf("unexpected key %q", key)
		}
		seen[key] = true
		if !p.eat(',') {
			if !p.eat('}') {
				return fmt.Errorf("expected ',' or '}' at %q", p.rest())
			}
			break
		}
	}
	if p.rest() != "" {
		return fmt.Errorf("trailing text %q", p.rest())
	}
	for _, k := range []string{"descr", "fortran_order", "shape"} {
		if !seen[k] {
			return fmt.Errorf("missing key %q", k)
		}
	}
	return nil
}

// litParser reads the few Python literals an npy header holds.
type litParser struct {
	s string
	i int
}

func (p *litParser) skip() {
	for p.i < len(p.s) && (p.s[p.i] == ' ' || p.s[p.i] == '\t') {
		p.i++
	}
}

func (p *litParser) rest() string { p.skip(); return p.s[p.i:] }

func (p *litParser) eat(c byte) bool {
	p.skip()
	if p.i < len(p.s) && p.s[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *litParser) str() (string, error) {
	p.skip()
	if p.i >= len(p.s) || (p.s[p.i] != '\'' && p.s[p.i] != '"') {
		return "", fmt.Errorf("expected a string at %q", p.s[p.i:])
	}
	q := p.s[p.i]
	j := strings.IndexByte(p.s[p.i+1:], q)
	if j < 0 {
		return "", fmt.Errorf("unterminated string")
	}
	v := p.s[p.i+1 : p.i+1+j]
	if strings.ContainsRune(v, '\\') {
		return "", fmt.Errorf("escapes are not supported in %q", v)
	}
	p.i += j + 2
	return v, nil
}

func (p *litParser) boolean() (bool, error) {
	p.skip()
	switch {
	case strings.HasPrefix(p.s[p.i:], "True"):
		p.i += 4
		return true, nil
	case strings.HasPrefix(p.s[p.i:], "False"):
		p.i += 5
		return false, nil
	}
	return false, fmt.Errorf("expected True or False at %q", p.s[p.i:])
}

func (p *litParser) intTuple() ([]int, error) {
	if !p.eat('(') {
		return nil, fmt.Errorf("expected a tuple at %q", p.rest())
	}
	shape := []int{}
	for {
		if p.eat(')') {
			return shape, nil
		}
		p.skip()
		j := p.i
		for j < len(p.s) && p.s[j] >= '0' && p.s[j] <= '9' {
			j++
		}
		n, err := strconv.Atoi(p.s[p.i:j])
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad dimension at %q", p.s[p.i:])
		}
		p.i = j
		if p.i < len(p.s) && p.s[p.i] == 'L' { // Python 2 long
			p.i++
		}
		if len(shape) >= maxDims {
			return nil, fmt.Errorf("more than %d dimensions", maxDims)
		}
		shape = append(shape, n)
		if !p.eat(',') {
			if !p.eat(')') {
				return nil, fmt.Errorf("expected ',' or ')' at %q", p.rest())
			}
			return shape, nil
		}
	}
}

// objectArrayHeader returns numpy's header for a (2,) object array, version
// 1.0, padded exactly as np.save pads it.
func objectArrayHeader() []byte {
	dict := "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
	dict += strings.Repeat(" ", growthAxisMaxDigits-len("2"))
	hlen := len(dict) + 1 // the newline
	pad := arrayAlign - (len(npyMagic)+2+2+hlen)%arrayAlign
	var b bytes.Buffer
	b.WriteString(npyMagic)
	b.Write([]byte{1, 0})
	var l [2]byte
	binary.LittleEndian.PutUint16(l[:], uint16(hlen+pad))
	b.Write(l[:])
	b.WriteString(dict)
	b.WriteString(strings.Repeat(" ", pad))
	b.WriteByte('\n')
	return b.Bytes()
}
