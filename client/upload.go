package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"sync"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/weights"
)

// Progress reports how far an upload or a download is; see WithProgress.
type Progress struct {
	// Op is "upload" or "download".
	Op string
	// Name is the uploaded file's base name or the downloaded file's id.
	Name string
	// Done is how many bytes moved so far; a retried upload starts again
	// from 0, a resumed download from what it already has.
	Done int64
	// Total is the size of the transfer, -1 while unknown.
	Total int64
	// Attempt counts the tries of the call, from 1.
	Attempt int
	// Finished is set on the last report of a call; Err says why it
	// failed, nil if it did not.
	Finished bool
	Err      error
}

// report calls the progress callback, if any.
func (c *Client) report(p Progress) {
	if c.progress != nil {
		c.progress(p)
	}
}

// UploadOption configures one FileUpload.
type UploadOption func(*uploadOptions)

type uploadOptions struct {
	metadata string
	key      string
}

// WithMetadata sends free text along with the file (the data part's
// "metadata"; default empty).
func WithMetadata(text string) UploadOption { return func(o *uploadOptions) { o.metadata = text } }

// WithIdempotencyKey sets the upload's Idempotency-Key instead of a random
// one. Uploads with the same key count once: the server answers a repeat
// with the first upload's file id. A caller that may itself re-run an
// upload (a job restarted after a crash) can derive a key from the round
// and file to keep that property across processes.
func WithIdempotencyKey(key string) UploadOption { return func(o *uploadOptions) { o.key = key } }

// newKey returns a random idempotency key.
func newKey() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return hex.EncodeToString(b)
}

// errFileChanged is the body's error when the file shrank while it was
// being sent.
var errFileChanged = errors.New("the file changed while it was being sent")

// errAborted is the body's error after the call that sent it returned.
var errAborted = errors.New("upload attempt finished")

// FileUpload checks that the file at path is a valid weights file (its
// structure, with the codec, without loading its tensors) and uploads it
// (POST /v1/file/upload) to the leaf's branch's current round. It returns
// the update's file id.
//
// The file streams from disk: memory does not grow with its size. The
// request carries a random Idempotency-Key (see WithIdempotencyKey), and
// transient failures are retried by sending the whole file again under the
// same key, so a retry after a lost answer does not count the update
// twice.
//
// Errors: EINVALID for a file that is not a valid weights file or does not
// match the round's first update, ECONFLICT when the branch's run is not
// started, ETOOLARGE past the server's size limit, EUNAUTHORIZED when
// logging in fails, EUNAVAILABLE when the server cannot be reached.
func (c *Client) FileUpload(ctx context.Context, path string, opts ...UploadOption) (string, error) {
	o := uploadOptions{}
	for _, opt := range opts {
		opt(&o)
	}
	if o.key == "" {
		o.key = newKey()
	}
	if _, err := weights.IndexFile(path); err != nil {
		if weights.AsError(err) != nil {
			return "", &Error{Code: branchkey.EINVALID, Message: fmt.Sprintf("%s is not a valid weights file: %v", path, err), Err: err}
		}
		return "", fmt.Errorf("upload %s: %w", path, err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("upload %s: %w", path, err)
	}
	name := filepath.Base(path)
	head, tail, contentType, err := multipartFrame(c.creds.LeafName, o.metadata, name)
	if err != nil {
		return "", fmt.Errorf("upload %s: %w", path, err)
	}
	total := int64(len(head)) + fi.Size() + int64(len(tail))
	var fileID string
	attempt := 0
	var done int64
	report := func(p Progress) {
		done = p.Done
		c.report(p)
	}
	err = c.call(ctx, func(s *Session) error {
		attempt++
		report(Progress{Op: "upload", Name: name, Total: total, Attempt: attempt})
		id, err := c.uploadOnce(ctx, s, path, fi.Size(), head, tail, contentType, o.key, name, total, attempt, report)
		fileID = id
		return err
	})
	if err == nil {
		done = total // an answer to a repeated key comes before the body
	}
	c.report(Progress{Op: "upload", Name: name, Done: done, Total: total, Attempt: attempt, Finished: true, Err: err})
	if err != nil {
		return "", fmt.Errorf("upload %s: %w", path, err)
	}
	return fileID, nil
}

// multipartFrame returns what the upload body holds before and after the
// file's bytes, and its Content-Type. The body is the published client's:
// a "data" part holding {"leaf_name", "metadata"} as JSON text and a "file"
// part named after the file. Sending head, the file and tail one after the
// other streams the file without a pipe or a goroutine, and gives the
// request an exact Content-Length, so the server can refuse a file that is
// too large before it is sent and progress knows its total.
func multipartFrame(leafName, metadata, filename string) (head, tail []byte, contentType string, err error) {
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	data, err := json.Marshal(struct {
		LeafName string `json:"leaf_name"`
		Metadata string `json:"metadata"`
	}{leafName, metadata})
	if err != nil {
		return nil, nil, "", err
	}
	if err := mw.WriteField("data", string(data)); err != nil {
		return nil, nil, "", err
	}
	if _, err := mw.CreateFormFile("file", filename); err != nil {
		return nil, nil, "", err
	}
	head = bytes.Clone(buf.Bytes())
	buf.Reset()
	if err := mw.Close(); err != nil {
		return nil, nil, "", err
	}
	return head, bytes.Clone(buf.Bytes()), mw.FormDataContentType(), nil
}

// uploadOnce sends the file once.
func (c *Client) uploadOnce(ctx context.Context, s *Session, path string, size int64, head, tail []byte, contentType, key, name string, total int64, attempt int, report func(Progress)) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	actx, dog, stop := newWatchdog(ctx, c.stall)
	defer stop()
	body := &uploadBody{
		r:   io.MultiReader(bytes.NewReader(head), &exactReader{r: io.NewSectionReader(f, 0, size), left: size}, bytes.NewReader(tail)),
		dog: dog,
		report: func(done int64) {
			report(Progress{Op: "upload", Name: name, Done: done, Total: total, Attempt: attempt})
		},
	}
	// The transport may still read the body after Do returned (when the
	// server answered early); stop it before the file closes.
	defer body.stop()
	req, err := c.newRequest(actx, http.MethodPost, "/v1/file/upload", body, s.LeafID, s.AccessToken)
	if err != nil {
		return "", err
	}
	req.ContentLength = total
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("Idempotency-Key", key)
	// The server answers a repeated key, or a refused token, before it
	// reads the body: with 100-continue the file is then not sent at all.
	req.Header.Set("Expect", "100-continue")
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, errFileChanged) {
			return "", clientError(branchkey.EINVALID, "%s: %v", path, errFileChanged)
		}
		return "", transportError(ctx, actx, err)
	}
	defer resp.Body.Close()
	dog.pause()
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return "", errorFrom(resp)
	}
	var out struct {
		FileID string `json:"file_id"`
	}
	if err := decodeData(resp, &out); err != nil {
		return "", err
	}
	if out.FileID == "" {
		return "", &Error{Status: resp.StatusCode, Code: branchkey.EINTERNAL, Message: "the upload answer has no file_id"}
	}
	return out.FileID, nil
}

// uploadBody is an upload's request body: it reports progress, keeps the
// stall watchdog alive, and can be stopped so that a transport still
// reading it after the call returned touches neither the file nor the
// callback.
type uploadBody struct {
	mu      sync.Mutex
	r       io.Reader
	done    int64
	stopped bool
	dog     *watchdog
	report  func(done int64)
}

func (b *uploadBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return 0, errAborted
	}
	n, err := b.r.Read(p)
	if n > 0 {
		b.done += int64(n)
		b.dog.kick()
		b.report(b.done)
	}
	if err == io.EOF {
		b.dog.pause() // the server now commits the file; no bytes move
	}
	return n, err
}

func (b *uploadBody) stop() {
	b.mu.Lock()
	b.stopped = true
	b.mu.Unlock()
}

// exactReader reads exactly left bytes from r and fails with
// errFileChanged if r ends first.
type exactReader struct {
	r    io.Reader
	left int64
}

func (e *exactReader) Read(p []byte) (int, error) {
	if e.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= int64(n)
	if err == io.EOF && e.left > 0 {
		return n, errFileChanged
	}
	if err == io.EOF {
		err = nil
	}
	return n, err
}
