package file_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/blobtest"
	"github.com/branchkey/branchkey/file"
)

// MustNew returns a BlobStore in a fresh temporary directory.
func MustNew(tb testing.TB) *file.BlobStore {
	tb.Helper()
	bs, err := file.New(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	return bs
}

func TestBlobStore(t *testing.T) {
	blobtest.Run(t, func(tb testing.TB) branchkey.BlobStore { return MustNew(tb) })
}

// TestTempFilesInvisible pins that a writer's temporary file, as a crash
// would leave it, is never listed or opened as a blob, and that New removes
// only old ones.
func TestTempFilesInvisible(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	bs, err := file.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	w, err := bs.Create(ctx, "updates/t1/b1/u1.npy")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("crash")); err != nil {
		t.Fatal(err)
	}
	// Simulate a crash: the writer is never committed or aborted.
	entries, err := os.ReadDir(filepath.Join(dir, "updates/t1/b1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("%d entries in the key's directory, want the one temporary file", len(entries))
	}
	tmp := entries[0].Name()
	if err := file.ValidKey("updates/t1/b1/" + tmp); err == nil {
		t.Fatalf("temporary file name %q is a valid key", tmp)
	}
	if _, err := bs.Open(ctx, "updates/t1/b1/u1.npy"); branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
		t.Fatalf("open of the crashed key = %v, want ENOTFOUND", err)
	}

	// A fresh temporary file survives New; an old one does not.
	if _, err := file.New(dir); err != nil {
		t.Fatal(err)
	}
	tmpPath := filepath.Join(dir, "updates/t1/b1", tmp)
	if _, err := os.Stat(tmpPath); err != nil {
		t.Fatalf("New removed a fresh temporary file: %v", err)
	}
	old := time.Now().Add(-2 * time.Hour)
	if err := os.Chtimes(tmpPath, old, old); err != nil {
		t.Fatal(err)
	}
	if _, err := file.New(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tmpPath); !os.IsNotExist(err) {
		t.Fatalf("New kept a two-hour-old temporary file: %v", err)
	}
}

// TestLayout pins that a key maps to the same relative path on disk, so
// operators can find blobs and backups stay plain files.
func TestLayout(t *testing.T) {
	dir := t.TempDir()
	bs, err := file.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := branchkey.PutBlob(context.Background(), bs, "aggregates/t1/b1/a1.npy", strings.NewReader("agg")); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "aggregates", "t1", "b1", "a1.npy"))
	if err != nil || string(got) != "agg" {
		t.Fatalf("read the blob's file: %q, %v", got, err)
	}
}

// TestKeyInsideBlob pins that a key below an existing blob's key is refused
// rather than failing with an internal error.
func TestKeyInsideBlob(t *testing.T) {
	bs := MustNew(t)
	ctx := context.Background()
	if _, err := branchkey.PutBlob(ctx, bs, "a/b", strings.NewReader("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := bs.Create(ctx, "a/b/c"); branchkey.ErrorCode(err) != branchkey.EINVALID {
		t.Fatalf("Create below a blob = %v, want EINVALID", err)
	}
	if _, err := bs.Open(ctx, "a/b/c"); branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
		t.Fatalf("Open below a blob = %v, want ENOTFOUND", err)
	}
	if err := bs.Delete(ctx, "a/b/c"); err != nil {
		t.Fatalf("Delete below a blob = %v, want nil", err)
	}
}
