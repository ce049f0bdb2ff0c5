// Package blobtest is the conformance suite for branchkey.BlobStore: every
// implementation (local files, S3) runs the same tests, so a new backend is
// proven by them. It tests only the interface contract.
package blobtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"sync"
	"testing"

	"github.com/branchkey/branchkey"
)

// Run runs the suite. open must return a BlobStore that is ready to use; it
// is called once per subtest and may return a store shared with other
// subtests, since every subtest uses keys of its own.
func Run(t *testing.T, open func(tb testing.TB) branchkey.BlobStore) {
	tests := []struct {
		name string
		fn   func(t *testing.T, bs branchkey.BlobStore)
	}{
		{"RoundTrip", testRoundTrip},
		{"LargeOddChunks", testLargeOddChunks},
		{"Empty", testEmpty},
		{"UncommittedInvisible", testUncommittedInvisible},
		{"AbortLeavesNothing", testAbortLeavesNothing},
		{"AbortAfterCommit", testAbortAfterCommit},
		{"ReplaceOnCommit", testReplaceOnCommit},
		{"NotFound", testNotFound},
		{"Delete", testDelete},
		{"InvalidKeys", testInvalidKeys},
		{"ConcurrentWriters", testConcurrentWriters},
		{"ContextCanceled", testContextCanceled},
		{"PutBlob", testPutBlob},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, open(t))
		})
	}
}

// key returns a key no other test uses, in a nested layout like the
// server's.
func key(t *testing.T, name string) string {
	t.Helper()
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("blobtest/%s/%s/%s.npy", sanitize(t.Name()), hex.EncodeToString(b[:]), name)
}

func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}

func put(t *testing.T, bs branchkey.BlobStore, k string, data []byte) {
	t.Helper()
	n, err := branchkey.PutBlob(context.Background(), bs, k, bytes.NewReader(data))
	if err != nil {
		t.Fatalf("put %s: %v", k, err)
	}
	if n != int64(len(data)) {
		t.Fatalf("put %s: wrote %d bytes, want %d", k, n, len(data))
	}
}

// readAll opens k and returns its bytes, checking Size agrees.
func readAll(t *testing.T, bs branchkey.BlobStore, k string) []byte {
	t.Helper()
	b, err := bs.Open(context.Background(), k)
	if err != nil {
		t.Fatalf("open %s: %v", k, err)
	}
	defer b.Close()
	data, err := io.ReadAll(b)
	if err != nil {
		t.Fatalf("read %s: %v", k, err)
	}
	if b.Size() != int64(len(data)) {
		t.Fatalf("%s: Size() = %d, read %d bytes", k, b.Size(), len(data))
	}
	return data
}

func wantCode(t *testing.T, err error, code, what string) {
	t.Helper()
	if got := branchkey.ErrorCode(err); got != code {
		t.Fatalf("%s: error %v has code %q, want %q", what, err, got, code)
	}
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func testRoundTrip(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "a")
	data := randomBytes(t, 10_000)
	put(t, bs, k, data)

	b, err := bs.Open(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Size() = %d, want %d", b.Size(), len(data))
	}

	// Sequential read in small pieces.
	head := make([]byte, 100)
	if _, err := io.ReadFull(b, head); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(head, data[:100]) {
		t.Fatal("Read: first 100 bytes differ")
	}

	// ReadAt does not depend on, or move, the read offset.
	mid := make([]byte, 1000)
	if n, err := b.ReadAt(mid, 4000); err != nil || n != len(mid) {
		t.Fatalf("ReadAt(4000) = %d, %v", n, err)
	}
	if !bytes.Equal(mid, data[4000:5000]) {
		t.Fatal("ReadAt(4000): bytes differ")
	}
	next := make([]byte, 50)
	if _, err := io.ReadFull(b, next); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(next, data[100:150]) {
		t.Fatal("Read after ReadAt: bytes differ; ReadAt moved the offset")
	}

	// ReadAt across the end returns what there is and io.EOF.
	tail := make([]byte, 100)
	n, err := b.ReadAt(tail, int64(len(data)-40))
	if n != 40 || err != io.EOF {
		t.Fatalf("ReadAt past the end = %d, %v; want 40, io.EOF", n, err)
	}
	if !bytes.Equal(tail[:40], data[len(data)-40:]) {
		t.Fatal("ReadAt past the end: bytes differ")
	}

	// Seek in every mode.
	if off, err := b.Seek(-10, io.SeekEnd); err != nil || off != int64(len(data)-10) {
		t.Fatalf("Seek(-10, End) = %d, %v", off, err)
	}
	rest, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(rest, data[len(data)-10:]) {
		t.Fatalf("read after Seek(End): %v", err)
	}
	if off, err := b.Seek(2000, io.SeekStart); err != nil || off != 2000 {
		t.Fatalf("Seek(2000, Start) = %d, %v", off, err)
	}
	if off, err := b.Seek(500, io.SeekCurrent); err != nil || off != 2500 {
		t.Fatalf("Seek(500, Current) = %d, %v", off, err)
	}
	got := make([]byte, 10)
	if _, err := io.ReadFull(b, got); err != nil || !bytes.Equal(got, data[2500:2510]) {
		t.Fatalf("read after Seek(Current): %v", err)
	}
	if _, err := b.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	all, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(all, data) {
		t.Fatalf("read all after Seek(0): %v", err)
	}
	if n, err := b.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("Read at the end = %d, %v; want 0, io.EOF", n, err)
	}
}

func testLargeOddChunks(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "large")
	const size = 6<<20 + 12345
	rng := mrand.New(mrand.NewPCG(1, 2))
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}

	w, err := bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	chunks := []int{1, 7, 4093, 65537, 1 << 20, 3, 999_999}
	for off, i := 0, 0; off < len(data); i++ {
		n := min(chunks[i%len(chunks)], len(data)-off)
		m, err := w.Write(data[off : off+n])
		if err != nil || m != n {
			_ = w.Abort()
			t.Fatalf("write %d bytes at %d = %d, %v", n, off, m, err)
		}
		off += n
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}

	b, err := bs.Open(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != size {
		t.Fatalf("Size() = %d, want %d", b.Size(), size)
	}
	h := sha256.New()
	if _, err := io.CopyBuffer(h, b, make([]byte, 10007)); err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	if !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("sequential read: sha256 differs")
	}
	for _, off := range []int64{0, 1, 4093, 1 << 20, size - 100_000} {
		p := make([]byte, 100_000)
		if _, err := b.ReadAt(p, off); err != nil {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
		if !bytes.Equal(p, data[off:off+int64(len(p))]) {
			t.Fatalf("ReadAt(%d): bytes differ", off)
		}
	}
}

func testEmpty(t *testing.T, bs branchkey.BlobStore) {
	k := key(t, "empty")
	put(t, bs, k, nil)
	if got := readAll(t, bs, k); len(got) != 0 {
		t.Fatalf("read %d bytes from an empty blob", len(got))
	}
}

func testUncommittedInvisible(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "pending")
	w, err := bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("not yet")); err != nil {
		t.Fatal(err)
	}
	_, err = bs.Open(ctx, k)
	wantCode(t, err, branchkey.ENOTFOUND, "open before commit")
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, bs, k); string(got) != "not yet" {
		t.Fatalf("after commit read %q", got)
	}
}

func testAbortLeavesNothing(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "aborted")
	w, err := bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(randomBytes(t, 5000)); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("second Abort: %v", err)
	}
	_, err = bs.Open(ctx, k)
	wantCode(t, err, branchkey.ENOTFOUND, "open after abort")
	if err := w.Commit(); err == nil {
		t.Fatal("Commit after Abort succeeded")
	}
	_, err = bs.Open(ctx, k)
	wantCode(t, err, branchkey.ENOTFOUND, "open after abort and commit")

	// Aborting a replacement keeps the old blob.
	put(t, bs, k, []byte("old"))
	w, err = bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("new")); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, bs, k); string(got) != "old" {
		t.Fatalf("after aborted replacement read %q, want old", got)
	}
}

func testAbortAfterCommit(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "committed")
	w, err := bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("kept")); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort after Commit: %v", err)
	}
	if got := readAll(t, bs, k); string(got) != "kept" {
		t.Fatalf("after Abort following Commit read %q", got)
	}
}

func testReplaceOnCommit(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "replaced")
	put(t, bs, k, []byte("first version"))
	w, err := bs.Create(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("second")); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, bs, k); string(got) != "first version" {
		t.Fatalf("before commit read %q, want the first version", got)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, bs, k); string(got) != "second" {
		t.Fatalf("after commit read %q, want second", got)
	}
}

func testNotFound(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "missing")
	_, err := bs.Open(ctx, k)
	wantCode(t, err, branchkey.ENOTFOUND, "open missing")

	// A key that is a prefix of other keys is not itself a blob.
	put(t, bs, k+"/inner/x", []byte("x"))
	_, err = bs.Open(ctx, k+"/inner")
	wantCode(t, err, branchkey.ENOTFOUND, "open a key prefix")
}

func testDelete(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	k := key(t, "deleted")
	put(t, bs, k, []byte("bye"))
	if err := bs.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	_, err := bs.Open(ctx, k)
	wantCode(t, err, branchkey.ENOTFOUND, "open deleted")
	if err := bs.Delete(ctx, k); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if err := bs.Delete(ctx, key(t, "never")); err != nil {
		t.Fatalf("Delete of a never-written key: %v", err)
	}

	// Deleting one blob leaves its neighbours, and the key can be reused.
	other := k + ".other"
	put(t, bs, other, []byte("stays"))
	put(t, bs, k, []byte("again"))
	if err := bs.Delete(ctx, k); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, bs, other); string(got) != "stays" {
		t.Fatalf("neighbour read %q", got)
	}
	put(t, bs, k, []byte("third"))
	if got := readAll(t, bs, k); string(got) != "third" {
		t.Fatalf("reused key read %q", got)
	}

}

func testInvalidKeys(t *testing.T, bs branchkey.BlobStore) {
	ctx := context.Background()
	bad := []struct {
		name string
		key  string
	}{
		{"Empty", ""},
		{"Absolute", "/etc/passwd"},
		{"DotDot", "updates/../../etc/passwd"},
		{"LeadingDotDot", "../outside"},
		{"Dot", "updates/./x.npy"},
		{"EmptySegment", "updates//x.npy"},
		{"TrailingSlash", "updates/x/"},
		{"Backslash", `updates\x.npy`},
		{"Space", "updates/a b.npy"},
		{"NUL", "updates/a\x00b"},
		{"Unicode", "updates/é.npy"},
		{"Tilde", "updates/~x.npy"},
		{"Colon", "c:x"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := bs.Create(ctx, tt.key)
			wantCode(t, err, branchkey.EINVALID, fmt.Sprintf("Create(%q)", tt.key))
			_, err = bs.Open(ctx, tt.key)
			wantCode(t, err, branchkey.EINVALID, fmt.Sprintf("Open(%q)", tt.key))
			err = bs.Delete(ctx, tt.key)
			wantCode(t, err, branchkey.EINVALID, fmt.Sprintf("Delete(%q)", tt.key))
		})
	}
	t.Run("GoodKeys", func(t *testing.T) {
		base := key(t, "ok")
		for _, k := range []string{base, base + "x/A-b_c.1.npy", base + ".state"} {
			put(t, bs, k, []byte(k))
			if got := readAll(t, bs, k); string(got) != k {
				t.Fatalf("%s read %q", k, got)
			}
		}
	})
}

func testConcurrentWriters(t *testing.T, bs branchkey.BlobStore) {
	const n = 16
	keys := make([]string, n)
	datas := make([][]byte, n)
	for i := range keys {
		keys[i] = key(t, fmt.Sprintf("w%d", i))
		datas[i] = randomBytes(t, 64<<10+i*1013)
	}
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			w, err := bs.Create(context.Background(), keys[i])
			if err != nil {
				errs <- err
				return
			}
			for off := 0; off < len(datas[i]); off += 4096 {
				if _, err := w.Write(datas[i][off:min(off+4096, len(datas[i]))]); err != nil {
					_ = w.Abort()
					errs <- err
					return
				}
			}
			if err := w.Commit(); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, k := range keys {
		if got := readAll(t, bs, k); !bytes.Equal(got, datas[i]) {
			t.Errorf("%s: read %d bytes, different from the %d written", k, len(got), len(datas[i]))
		}
	}
}

func testContextCanceled(t *testing.T, bs branchkey.BlobStore) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()

	t.Run("Create", func(t *testing.T) {
		k := key(t, "c")
		w, err := bs.Create(canceled, k)
		if err == nil {
			// A lazy implementation may only notice at Write or Commit; it
			// must not publish the blob.
			_, werr := w.Write([]byte("x"))
			cerr := w.Commit()
			if werr == nil && cerr == nil {
				t.Fatal("Create, Write and Commit all succeeded with a canceled context")
			}
			_ = w.Abort()
		}
		_, err = bs.Open(context.Background(), k)
		wantCode(t, err, branchkey.ENOTFOUND, "open after canceled create")
	})

	t.Run("CancelDuringWrite", func(t *testing.T) {
		k := key(t, "c")
		ctx, cancel := context.WithCancel(context.Background())
		w, err := bs.Create(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte("partial")); err != nil {
			t.Fatal(err)
		}
		cancel()
		_, werr := w.Write([]byte(" more"))
		cerr := w.Commit()
		if werr == nil && cerr == nil {
			t.Fatal("Write and Commit both succeeded after the context was canceled")
		}
		_ = w.Abort()
		_, err = bs.Open(context.Background(), k)
		wantCode(t, err, branchkey.ENOTFOUND, "open after canceled write")
	})

	t.Run("Open", func(t *testing.T) {
		k := key(t, "c")
		put(t, bs, k, []byte("x"))
		if b, err := bs.Open(canceled, k); err == nil {
			b.Close()
			t.Fatal("Open with a canceled context succeeded")
		}
	})

	t.Run("Delete", func(t *testing.T) {
		k := key(t, "c")
		put(t, bs, k, []byte("x"))
		if err := bs.Delete(canceled, k); err == nil {
			if _, oerr := bs.Open(context.Background(), k); oerr == nil {
				t.Fatal("Delete with a canceled context returned nil but left the blob")
			}
		}
	})
}

func testPutBlob(t *testing.T, bs branchkey.BlobStore) {
	k := key(t, "putblob")
	data := randomBytes(t, 300_001)
	put(t, bs, k, data)
	if got := readAll(t, bs, k); !bytes.Equal(got, data) {
		t.Fatal("bytes differ")
	}

	// A failing reader aborts the blob.
	k2 := key(t, "failing")
	boom := errors.New("boom")
	_, err := branchkey.PutBlob(context.Background(), bs, k2, io.MultiReader(bytes.NewReader(data[:1000]), errReader{boom}))
	if !errors.Is(err, boom) {
		t.Fatalf("PutBlob with a failing reader = %v, want boom", err)
	}
	_, err = bs.Open(context.Background(), k2)
	wantCode(t, err, branchkey.ENOTFOUND, "open after failed PutBlob")
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }
