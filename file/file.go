// Package file implements branchkey.BlobStore on a local directory: one
// regular file per blob, written to a temporary file beside its final name and
// renamed into place on Commit, so a reader only ever sees whole, durable
// blobs.
package file

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/branchkey/branchkey"
)

var _ branchkey.BlobStore = (*BlobStore)(nil)

// tempPrefix starts the name of every file that is still being written. '~'
// is not allowed in keys, so no key can name a temporary file and a crash
// can never make one visible as a blob.
const tempPrefix = "~tmp-"

// staleTemp is how old a leftover temporary file must be before New removes
// it: older than any upload still in flight could plausibly be.
const staleTemp = time.Hour

// BlobStore stores blobs as files under a root directory. It is safe for
// concurrent use.
type BlobStore struct {
	root string
}

// New returns a BlobStore rooted at dir, creating the directory if needed and
// removing temporary files that a crash left behind more than an hour ago.
func New(dir string) (*BlobStore, error) {
	root, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("blob store %s: %w", dir, err)
	}
	if err := os.MkdirAll(root, 0o750); err != nil {
		return nil, fmt.Errorf("blob store %s: %w", root, err)
	}
	if err := removeStaleTemps(root, time.Now().Add(-staleTemp)); err != nil {
		return nil, fmt.Errorf("blob store %s: clean temporary files: %w", root, err)
	}
	return &BlobStore{root: root}, nil
}

// Dir returns the directory the blobs are stored in.
func (s *BlobStore) Dir() string { return s.root }

// removeStaleTemps deletes temporary files under root last modified before
// cutoff. Newer ones may belong to a writer in another process.
func removeStaleTemps(root string, cutoff time.Time) error {
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() || !strings.HasPrefix(d.Name(), tempPrefix) {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if info.ModTime().Before(cutoff) {
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	})
}

// ValidKey reports whether key can name a blob: branchkey.ValidBlobKey.
func ValidKey(key string) error { return branchkey.ValidBlobKey(key) }

// path returns the file name of a valid key.
func (s *BlobStore) path(key string) string {
	return filepath.Join(s.root, filepath.FromSlash(key))
}

// Create starts a blob under key. Its bytes go to a temporary file in the
// key's directory; Commit makes them durable and visible. ctx governs the
// whole write: once it is done, Write and Commit fail and nothing is
// published. EINVALID for a bad key.
func (s *BlobStore) Create(ctx context.Context, key string) (branchkey.BlobWriter, error) {
	if err := ValidKey(key); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("create blob %s: %w", key, err)
	}
	path := s.path(key)
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		if errors.Is(err, syscall.ENOTDIR) {
			return nil, branchkey.Errorf(branchkey.EINVALID, "blob key %q is inside another blob", key)
		}
		return nil, fmt.Errorf("create blob %s: %w", key, err)
	}
	f, err := os.CreateTemp(dir, tempPrefix+filepath.Base(path)+"-*")
	if err != nil {
		return nil, fmt.Errorf("create blob %s: %w", key, err)
	}
	return &writer{ctx: ctx, root: s.root, key: key, path: path, f: f}, nil
}

// Open opens the blob under key. ENOTFOUND if there is none, EINVALID for a
// bad key.
func (s *BlobStore) Open(ctx context.Context, key string) (branchkey.Blob, error) {
	if err := ValidKey(key); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open blob %s: %w", key, err)
	}
	f, err := os.Open(s.path(key))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil, branchkey.Errorf(branchkey.ENOTFOUND, "blob %q not found", key)
		}
		return nil, fmt.Errorf("open blob %s: %w", key, err)
	}
	info, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("open blob %s: %w", key, err)
	}
	if !info.Mode().IsRegular() {
		// A directory that holds other blobs' keys is not a blob itself.
		_ = f.Close()
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "blob %q not found", key)
	}
	return &blob{f: f, size: info.Size()}, nil
}

// Delete removes the blob under key; a missing key is not an error. Emptied
// directories are left in place: removing them would race with a concurrent
// Create in the same directory. EINVALID for a bad key.
func (s *BlobStore) Delete(ctx context.Context, key string) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete blob %s: %w", key, err)
	}
	path := s.path(key)
	info, err := os.Lstat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil
		}
		return fmt.Errorf("delete blob %s: %w", key, err)
	}
	if info.IsDir() {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("delete blob %s: %w", key, err)
	}
	return nil
}

// writer is a BlobWriter writing to a temporary file.
type writer struct {
	ctx  context.Context
	root string
	key  string
	path string
	f    *os.File
	// done is set once the writer is committed or aborted; every later
	// call is a no-op or an error.
	done      bool
	committed bool
}

// Write appends p to the blob. It fails once the writer's context is done.
func (w *writer) Write(p []byte) (int, error) {
	if w.done {
		return 0, fmt.Errorf("write blob %s: %w", w.key, os.ErrClosed)
	}
	if err := w.ctx.Err(); err != nil {
		return 0, fmt.Errorf("write blob %s: %w", w.key, err)
	}
	n, err := w.f.Write(p)
	if err != nil {
		return n, fmt.Errorf("write blob %s: %w", w.key, err)
	}
	return n, nil
}

// Commit flushes the file to disk, renames it over the key and flushes the
// directories on the way to the root, so the blob and its name survive a
// crash once Commit returns nil. On failure nothing is published.
func (w *writer) Commit() error {
	if w.done {
		if w.committed {
			return nil
		}
		return fmt.Errorf("commit blob %s: %w", w.key, os.ErrClosed)
	}
	w.done = true
	if err := w.commit(); err != nil {
		_ = w.f.Close()
		_ = os.Remove(w.f.Name())
		return fmt.Errorf("commit blob %s: %w", w.key, err)
	}
	w.committed = true
	return nil
}

func (w *writer) commit() error {
	if err := w.ctx.Err(); err != nil {
		return err
	}
	if err := w.f.Sync(); err != nil {
		return err
	}
	if err := w.f.Close(); err != nil {
		return err
	}
	if err := os.Rename(w.f.Name(), w.path); err != nil {
		return err
	}
	// The rename lives in the key's directory; that directory may itself be
	// new (Create made it), so its entry in its parent must be flushed too,
	// and so on up to the root. Syncing an unchanged directory is cheap.
	for dir := filepath.Dir(w.path); ; dir = filepath.Dir(dir) {
		if err := syncDir(dir); err != nil {
			return err
		}
		if dir == w.root || len(dir) <= len(w.root) {
			return nil
		}
	}
}

// Abort discards the bytes written so far. It is a no-op after Commit or
// Abort.
func (w *writer) Abort() error {
	if w.done {
		return nil
	}
	w.done = true
	_ = w.f.Close()
	if err := os.Remove(w.f.Name()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("abort blob %s: %w", w.key, err)
	}
	return nil
}

// syncDir flushes a directory's entries to disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// blob is an open blob file and its size at the time it was opened. A blob
// is never modified in place (Commit renames a new file over it), so the size
// stays true for as long as the file is open.
type blob struct {
	f    *os.File
	size int64
}

// Read reads the next bytes of the blob.
func (b *blob) Read(p []byte) (int, error) { return b.f.Read(p) }

// ReadAt reads the blob at an offset.
func (b *blob) ReadAt(p []byte, off int64) (int, error) { return b.f.ReadAt(p, off) }

// Seek sets the offset of the next Read.
func (b *blob) Seek(offset int64, whence int) (int64, error) { return b.f.Seek(offset, whence) }

// Close closes the blob.
func (b *blob) Close() error { return b.f.Close() }

// Size is the blob's length in bytes.
func (b *blob) Size() int64 { return b.size }
