package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/weights"
)

// validFileID matches file ids: letters, digits and '-' (wire-v1.md), so an
// id is safe as a file name.
var validFileID = regexp.MustCompile(`^[A-Za-z0-9-]{1,128}$`)

// copyBuffer is the size of a download's copy buffer.
const copyBuffer = 256 << 10

// download is the state of one FileDownload across its attempts.
type download struct {
	id    string
	f     *os.File
	done  int64  // bytes in f
	total int64  // the file's size, -1 until an answer says
	etag  string // the server's validator, sent with If-Range on resume
}

// FileDownload downloads a file (GET /v1/file/download/{id}), an aggregate
// of the leaf's branch or one of its own uploads, into the download
// directory (see WithDownloadDir) as <dir>/<id>, and returns that path.
//
// The bytes stream into a temporary file in the same directory; a
// connection that breaks is resumed with a Range request where the server
// allows it (206 with the expected Content-Range), and started again
// otherwise. Once complete, the file is checked with the codec and renamed
// into place atomically, so <dir>/<id> is either absent or whole.
//
// Errors: ENOTFOUND for an unknown id, EFORBIDDEN for another branch's
// file, EINVALID for an id that is not one or an answer that is not a
// valid weights file (an empty one included), EUNAUTHORIZED when logging in
// fails, EUNAVAILABLE when the server cannot be reached.
func (c *Client) FileDownload(ctx context.Context, id string) (string, error) {
	if !validFileID.MatchString(id) {
		return "", clientError(branchkey.EINVALID, "%q is not a file id (letters, digits and '-')", id)
	}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return "", fmt.Errorf("download %s: %w", id, err)
	}
	f, err := os.CreateTemp(c.dir, "."+id+".*.part")
	if err != nil {
		return "", fmt.Errorf("download %s: %w", id, err)
	}
	d := &download{id: id, f: f, total: -1}
	path := filepath.Join(c.dir, id)
	attempt := 0
	err = c.call(ctx, func(s *Session) error {
		attempt++
		c.report(Progress{Op: "download", Name: id, Done: d.done, Total: d.total, Attempt: attempt})
		return c.downloadOnce(ctx, s, d, attempt)
	})
	if err == nil {
		err = d.finish(path)
	}
	c.report(Progress{Op: "download", Name: id, Done: d.done, Total: d.total, Attempt: attempt, Finished: true, Err: err})
	if err != nil {
		_ = f.Close()
		_ = os.Remove(f.Name())
		return "", fmt.Errorf("download %s: %w", id, err)
	}
	return path, nil
}

// finish syncs the temporary file, checks it, and renames it to path.
func (d *download) finish(path string) error {
	if d.done == 0 {
		return clientError(branchkey.EINVALID, "the server sent an empty file")
	}
	// CreateTemp made it private; the file is for the training code, as
	// any file the leaf writes would be.
	if err := d.f.Chmod(0o644); err != nil {
		return err
	}
	if err := d.f.Sync(); err != nil {
		return err
	}
	if err := d.f.Close(); err != nil {
		return err
	}
	if _, err := weights.IndexFile(d.f.Name()); err != nil {
		if weights.AsError(err) != nil {
			return &Error{Code: branchkey.EINVALID, Message: fmt.Sprintf("the server sent %d bytes that are not a valid weights file: %v", d.done, weights.AsError(err)), Err: err}
		}
		return err
	}
	if err := os.Rename(d.f.Name(), path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return err
	}
	return nil
}

// restart empties the temporary file, to download from the start.
func (d *download) restart() error {
	if err := d.f.Truncate(0); err != nil {
		return err
	}
	if _, err := d.f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	d.done = 0
	return nil
}

// downloadOnce asks for what is still missing and appends it to d.f.
func (c *Client) downloadOnce(ctx context.Context, s *Session, d *download, attempt int) error {
	actx, dog, stop := newWatchdog(ctx, c.stall)
	defer stop()
	req, err := c.newRequest(actx, http.MethodGet, "/v1/file/download/"+d.id, nil, s.LeafID, s.AccessToken)
	if err != nil {
		return err
	}
	// Identity, so the transport does not decompress and byte offsets are
	// offsets in the file.
	req.Header.Set("Accept-Encoding", "identity")
	if d.done > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", d.done))
		if d.etag != "" {
			req.Header.Set("If-Range", d.etag)
		}
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return transportError(ctx, actx, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
		if d.done > 0 {
			c.log.Info("the server ignored the range; downloading from the start", "file", d.id, "had", d.done)
			if err := d.restart(); err != nil {
				return err
			}
		}
		d.total = resp.ContentLength
	case http.StatusPartialContent:
		start, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != d.done {
			c.log.Warn("unexpected Content-Range; downloading from the start", "file", d.id, "content_range", resp.Header.Get("Content-Range"), "had", d.done)
			if err := d.restart(); err != nil {
				return err
			}
			return unreachable(fmt.Errorf("the server sent range %q for bytes=%d-", resp.Header.Get("Content-Range"), d.done))
		}
		d.total = size
	case http.StatusRequestedRangeNotSatisfiable:
		if err := d.restart(); err != nil {
			return err
		}
		return unreachable(fmt.Errorf("the server refused the range of a resumed download"))
	default:
		return errorFrom(resp)
	}
	if etag := resp.Header.Get("ETag"); etag != "" && !strings.HasPrefix(etag, "W/") {
		d.etag = etag
	}
	c.report(Progress{Op: "download", Name: d.id, Done: d.done, Total: d.total, Attempt: attempt})
	buf := make([]byte, copyBuffer)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			dog.kick()
			if _, err := d.f.Write(buf[:n]); err != nil {
				return fmt.Errorf("write %s: %w", d.f.Name(), err)
			}
			d.done += int64(n)
			c.report(Progress{Op: "download", Name: d.id, Done: d.done, Total: d.total, Attempt: attempt})
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return transportError(ctx, actx, rerr)
		}
	}
	if d.total >= 0 && d.done != d.total {
		return unreachable(fmt.Errorf("the download ended at byte %d of %d", d.done, d.total))
	}
	return nil
}

// parseContentRange parses "bytes START-END/SIZE" and returns START and
// SIZE (-1 for "*").
func parseContentRange(v string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, total, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	first, last, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(first, 10, 64)
	end, err2 := strconv.ParseInt(last, 10, 64)
	if err1 != nil || err2 != nil || start < 0 || end < start {
		return 0, 0, false
	}
	size = -1
	if total != "*" {
		n, err := strconv.ParseInt(total, 10, 64)
		if err != nil || n <= end {
			return 0, 0, false
		}
		size = n
	}
	return start, size, true
}
