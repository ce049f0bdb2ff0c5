package weights

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
)

// input is a buffered reader that knows its position, skips by seeking when
// it can, and never allocates more than the bytes it really receives.
type input struct {
	r      io.Reader
	seeker io.Seeker   // set when skipping may seek instead of reading
	ra     io.ReaderAt // set when large reads may go in parallel
	size   int64       // total length when known, else -1
	buf    []byte
	lo, hi int   // buf[lo:hi] is buffered and unread
	pos    int64 // offset of buf[lo] in the stream
	eof    bool
}

const inputBufSize = 64 << 10

func newInput(r io.Reader, size int64) *input {
	in := &input{r: r, size: size, buf: make([]byte, inputBufSize)}
	if s, ok := r.(io.Seeker); ok && size >= 0 {
		in.seeker = s
		if ra, ok := r.(io.ReaderAt); ok {
			in.ra = ra
		}
	}
	return in
}

// remaining returns how many bytes are left, or -1 when unknown.
func (in *input) remaining() int64 {
	if in.size < 0 {
		return -1
	}
	return in.size - in.pos
}

var errShort = fmt.Errorf("%w", ErrTruncated)

// fill makes at least n bytes available in buf[lo:hi], n <= len(buf).
func (in *input) fill(n int) error {
	if in.hi-in.lo >= n {
		return nil
	}
	if in.lo > 0 {
		copy(in.buf, in.buf[in.lo:in.hi])
		in.hi -= in.lo
		in.lo = 0
	}
	for in.hi < n {
		if in.eof {
			return errShort
		}
		m, err := in.r.Read(in.buf[in.hi:])
		in.hi += m
		if err == io.EOF {
			in.eof = true
		} else if err != nil {
			return err
		}
	}
	return nil
}

// byte reads one byte.
func (in *input) byte() (byte, error) {
	if in.lo == in.hi {
		if err := in.fill(1); err != nil {
			return 0, err
		}
	}
	c := in.buf[in.lo]
	in.lo++
	in.pos++
	return c, nil
}

// next returns the next n bytes, n <= len(buf). The slice is valid until the
// next call.
func (in *input) next(n int) ([]byte, error) {
	if n > len(in.buf) {
		return nil, fmt.Errorf("internal: read of %d bytes exceeds the buffer", n)
	}
	if err := in.fill(n); err != nil {
		return nil, err
	}
	b := in.buf[in.lo : in.lo+n]
	in.lo += n
	in.pos += int64(n)
	return b, nil
}

// check fails at once when n bytes cannot be in the rest of the input.
func (in *input) check(n int64) error {
	if n < 0 {
		return fmt.Errorf("negative length %d", n)
	}
	if rem := in.remaining(); rem >= 0 && n > rem {
		return fmt.Errorf("claims %d bytes but only %d remain: %w", n, rem, ErrTruncated)
	}
	return nil
}

// read returns the next n bytes in a new slice of exactly n bytes when the
// input's size is known; for a stream it grows the slice as bytes arrive, so
// a false length claim costs at most what was really sent.
func (in *input) read(n int64) ([]byte, error) {
	if err := in.check(n); err != nil {
		return nil, err
	}
	if in.size >= 0 {
		b := make([]byte, n)
		return b, in.readFull(b)
	}
	const step = 1 << 20
	b := make([]byte, 0, min(n, step))
	for int64(len(b)) < n {
		if len(b) == cap(b) {
			nb := make([]byte, len(b), min(n, 2*int64(cap(b))))
			copy(nb, b)
			b = nb
		}
		k := min(int64(cap(b)), n)
		chunk := b[len(b):k]
		if err := in.readFull(chunk); err != nil {
			return nil, err
		}
		b = b[:k]
	}
	return b, nil
}

// readFull fills dst from the input.
func (in *input) readFull(dst []byte) error {
	k := copy(dst, in.buf[in.lo:in.hi])
	in.lo += k
	in.pos += int64(k)
	if k == len(dst) {
		return nil
	}
	if rest := dst[k:]; in.ra != nil && len(rest) >= parallelRead {
		// A large tensor from a file: read it with several preads at once.
		// Most of the time of a big read goes to faulting in the fresh
		// pages it lands in, which the cores can do side by side.
		if err := readAtParallel(in.ra, rest, in.pos); err != nil {
			return err
		}
		if _, err := in.seeker.Seek(int64(len(rest)), io.SeekCurrent); err != nil {
			return err
		}
		in.pos += int64(len(rest))
		return nil
	}
	m, err := io.ReadFull(in.r, dst[k:])
	in.pos += int64(m)
	if errors.Is(err, io.ErrUnexpectedEOF) || err == io.EOF {
		in.eof = true
		return errShort
	}
	return err
}

// skip passes over n bytes, seeking when the input allows it.
func (in *input) skip(n int64) error {
	if err := in.check(n); err != nil {
		return err
	}
	buffered := int64(in.hi - in.lo)
	if n <= buffered {
		in.lo += int(n)
		in.pos += n
		return nil
	}
	in.lo, in.hi = 0, 0
	in.pos += buffered
	rest := n - buffered
	if in.seeker != nil {
		if _, err := in.seeker.Seek(rest, io.SeekCurrent); err != nil {
			return err
		}
		in.pos += rest
		return nil
	}
	return in.stream(rest, 1, nil)
}

// stream passes the next n bytes to fn in chunks whose lengths are multiples
// of unit (n must be one), keeping none of them.
func (in *input) stream(n int64, unit int, fn func([]byte) error) error {
	if err := in.check(n); err != nil {
		return err
	}
	chunk := len(in.buf) / unit * unit
	for n > 0 {
		want := int(min(n, int64(chunk)))
		if in.hi-in.lo < want {
			// Take what is buffered, rounded down to whole elements, before
			// reading more, so large reads go straight into the buffer.
			if have := (in.hi - in.lo) / unit * unit; have > 0 {
				want = have
			} else if err := in.fill(want); err != nil {
				return err
			}
		}
		b := in.buf[in.lo : in.lo+want]
		if fn != nil {
			if err := fn(b); err != nil {
				return err
			}
		}
		in.lo += want
		in.pos += int64(want)
		n -= int64(want)
	}
	return nil
}

// parallelRead is the smallest read split over several goroutines.
const parallelRead = 8 << 20

// readAtParallel fills dst from r at off with up to GOMAXPROCS concurrent
// ReadAt calls of at least 4 MiB each.
func readAtParallel(r io.ReaderAt, dst []byte, off int64) error {
	parts := min(runtime.GOMAXPROCS(0), len(dst)/(4<<20))
	if parts < 2 {
		_, err := r.ReadAt(dst, off)
		if err == io.EOF {
			err = errShort
		}
		return err
	}
	step := (len(dst) + parts - 1) / parts
	errs := make([]error, parts)
	var wg sync.WaitGroup
	for i := range parts {
		lo, hi := i*step, min((i+1)*step, len(dst))
		wg.Add(1)
		go func() {
			defer wg.Done()
			n, err := r.ReadAt(dst[lo:hi], off+int64(lo))
			if err == io.EOF && n == hi-lo {
				err = nil
			} else if err == io.EOF {
				err = errShort
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}
