package weights_test

import (
	"bytes"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/branchkey/branchkey/weights"
)

// FuzzDecode feeds arbitrary bytes to every reading mode. None may panic or
// hang; they must agree on whether the input is an update and on what it
// holds; and reading must allocate no more than a small multiple of the
// input (plus fixed buffers), whatever lengths the input claims.
//
// The seed corpus is every fixture plus testdata/fuzz/FuzzDecode; run it
// longer with: go test -run '^$' -fuzz FuzzDecode -fuzztime 10m ./weights/
func FuzzDecode(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(fixtures, "*.npy"))
	more, _ := filepath.Glob(filepath.Join(fixtures, "round_*", "*.npy"))
	for _, p := range append(files, more...) {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		u1, err1 := weights.Decode(iotest{bytes.NewReader(b)})
		runtime.ReadMemStats(&after)
		// fixed costs: the 64 KiB input buffer, the float16 table once,
		// small per-opcode values; the rest must be paid for by input bytes.
		if got, limit := after.TotalAlloc-before.TotalAlloc, uint64(64*len(b))+2<<20; got > limit {
			t.Fatalf("Decode of %d bytes allocated %d bytes (limit %d)", len(b), got, limit)
		}
		u2, err2 := weights.DecodeAt(bytes.NewReader(b), int64(len(b)))
		u3, err3 := weights.Index(bytes.NewReader(b), int64(len(b)))
		var seen int64
		u4, err4 := weights.Scan(bytes.NewReader(b), func(i int, tn *weights.Tensor, chunk []byte) error {
			if len(chunk)%tn.DType.Size != 0 {
				t.Fatalf("chunk of %d bytes for %s", len(chunk), tn.DType)
			}
			seen += int64(len(chunk))
			return nil
		})
		ok := err1 == nil
		for _, e := range []error{err2, err3, err4} {
			if (e == nil) != ok {
				t.Fatalf("modes disagree: Decode=%v DecodeAt=%v Index=%v Scan=%v", err1, err2, err3, err4)
			}
		}
		for _, e := range []error{err1, err2, err3, err4} {
			if e != nil && weights.AsError(e) == nil {
				t.Fatalf("error %v is not a *weights.Error", e)
			}
		}
		if !ok {
			return
		}
		for _, u := range []*weights.Update{u2, u3, u4} {
			if u.Signature() != u1.Signature() || u.NumSamples != u1.NumSamples {
				t.Fatalf("modes disagree on the update: %q vs %q", u.Signature(), u1.Signature())
			}
		}
		var total int64
		for i := range u1.Tensors {
			tn := &u1.Tensors[i]
			total += tn.NBytes()
			if int64(len(tn.Data)) != tn.NBytes() || !bytes.Equal(u2.Tensors[i].Data, tn.Data) {
				t.Fatalf("tensor %d: data length %d for %d bytes", i, len(tn.Data), tn.NBytes())
			}
			off := u3.Tensors[i].Offset
			if off < 0 || off+tn.NBytes() > int64(len(b)) || !bytes.Equal(b[off:off+tn.NBytes()], tn.Data) {
				t.Fatalf("tensor %d: index offset %d is wrong", i, off)
			}
		}
		if seen > total {
			t.Fatalf("Scan visited %d bytes of %d", seen, total)
		}
		// What decodes must encode, and decode again to the same thing.
		var enc bytes.Buffer
		if err := weights.Encode(&enc, u1); err != nil {
			t.Fatalf("encode a decoded update: %v", err)
		}
		u5, err := weights.Decode(&enc)
		if err != nil || u5.Signature() != u1.Signature() {
			t.Fatalf("re-decode: %v", err)
		}
	})
}
