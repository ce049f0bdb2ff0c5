// Package s3 implements branchkey.BlobStore on S3-compatible object storage
// (Amazon S3, MinIO, Ceph RGW, ...) with minio-go: the blob store for
// several branchkey server replicas, which all see the same bucket.
//
// A blob is one object, named by the store's key prefix and the blob's key.
// Create streams the blob: its first part is buffered, and a blob that ends
// within it is stored with one PUT; a larger blob is piped into a multipart
// upload of unknown size, part by part, so a writer holds at most about two
// parts in memory (Config.PartSize, 16 MiB by default) whatever the blob's
// size. The object appears, whole, only when the upload completes in Commit;
// Abort, a failed write or a cancelled context aborts the upload and nothing
// appears. Uploads that a crashed process left incomplete are never visible
// but keep their parts until deleted: give the bucket a lifecycle rule that
// aborts incomplete multipart uploads after a day.
//
// Open reads with ranged GETs pinned to the object's ETag, so a blob replaced
// while it is read fails the read instead of mixing two versions.
//
// The tests run against gofakes3, an S3 server in Go (in-memory backend)
// started in a child process, so that memory measured in the test process is
// the client's alone; neither Debian nor the Go module proxy offers a
// maintained S3 server that is lighter to run (MinIO's server is AGPL, and
// Debian ships none).
package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/dustin/go-humanize"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"

	"github.com/branchkey/branchkey"
)

var _ branchkey.BlobStore = (*BlobStore)(nil)

// Part sizes. S3 allows at most 10,000 parts per object, so the part size
// also bounds a blob's size: 16 MiB parts allow blobs of up to 156 GiB.
const (
	DefaultPartSize int64 = 16 << 20
	MinPartSize     int64 = 5 << 20 // S3's smallest part but the last
	MaxPartSize     int64 = 5 << 30 // S3's largest part
)

// DefaultEndpoint is Amazon S3's.
const DefaultEndpoint = "s3.amazonaws.com"

// maxRetries is how many times the client retries a request that failed in
// a way worth retrying (a network error, 5xx, SlowDown). Few, so that an
// outage reaches the caller as EUNAVAILABLE within seconds.
const maxRetries = 3

// Config says where the blobs are and how to reach them.
type Config struct {
	// Endpoint is the server's host[:port], without a scheme; "" is
	// DefaultEndpoint.
	Endpoint string
	// Bucket holds the blobs. It must exist.
	Bucket string
	// Prefix, if not "", is prepended with a '/' to every key, so several
	// deployments can share a bucket. It follows the rules of keys.
	Prefix string
	// Region is the bucket's region; "" lets the client ask the server.
	Region string
	// AccessKey, SecretKey and SessionToken (optional) are the
	// credentials requests are signed with.
	AccessKey    string
	SecretKey    string
	SessionToken string
	// Insecure talks plain HTTP instead of HTTPS.
	Insecure bool
	// PartSize is the size of a multipart upload's parts, between
	// MinPartSize and MaxPartSize; 0 is DefaultPartSize.
	PartSize int64
}

// String describes c as a URL ParseURL reads, without the credentials, for
// logs and messages.
func (c Config) String() string {
	u := url.URL{Scheme: "s3", Host: c.Bucket}
	if c.Prefix != "" {
		u.Path = "/" + c.Prefix
	}
	q := url.Values{}
	if c.Endpoint != "" {
		q.Set("endpoint", c.Endpoint)
	}
	if c.Region != "" {
		q.Set("region", c.Region)
	}
	if c.Insecure {
		q.Set("insecure", "true")
	}
	if c.PartSize != 0 {
		q.Set("part_size", strconv.FormatInt(c.PartSize, 10))
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// ParseURL reads the server's --blobs flag for S3:
//
//	s3://BUCKET[/PREFIX][?endpoint=HOST[:PORT]][&region=REGION][&insecure=true][&part_size=SIZE]
//
// endpoint defaults to Amazon S3; region, when absent, is AWS_REGION's (or
// asked of the server); insecure=true talks plain HTTP (a local MinIO, say);
// part_size is the multipart part size, in bytes or with a unit ("16MiB").
// The credentials come from the standard environment, never from the URL:
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for temporary credentials,
// AWS_SESSION_TOKEN. For example:
//
//	s3://models/branchkey?endpoint=127.0.0.1:9000&region=us-east-1&insecure=true
//
// EINVALID for a URL that is not of this form.
func ParseURL(s string) (Config, error) {
	invalid := func(format string, args ...any) (Config, error) {
		return Config{}, branchkey.Errorf(branchkey.EINVALID, "blob store URL %q: %s", redact(s), fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(s)
	if err != nil {
		return invalid("%v", errors.Unwrap(err))
	}
	if u.Scheme != "s3" {
		return invalid("the scheme is not s3")
	}
	if u.User != nil {
		return invalid("credentials do not belong in the URL; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
	}
	if u.Opaque != "" || u.Fragment != "" {
		return invalid("want s3://BUCKET/PREFIX?endpoint=HOST:PORT")
	}
	c := Config{
		Bucket:       u.Host,
		Prefix:       strings.Trim(u.Path, "/"),
		Region:       os.Getenv("AWS_REGION"),
		AccessKey:    os.Getenv("AWS_ACCESS_KEY_ID"),
		SecretKey:    os.Getenv("AWS_SECRET_ACCESS_KEY"),
		SessionToken: os.Getenv("AWS_SESSION_TOKEN"),
	}
	for name, vs := range u.Query() {
		if len(vs) != 1 {
			return invalid("%s is given %d times", name, len(vs))
		}
		v := vs[0]
		switch name {
		case "endpoint":
			c.Endpoint = v
		case "region":
			c.Region = v
		case "insecure":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return invalid("insecure=%q is not true or false", v)
			}
			c.Insecure = b
		case "part_size":
			n, err := humanize.ParseBytes(v)
			if err != nil || n > uint64(MaxPartSize) {
				return invalid("part_size=%q is not a size of at most 5GiB", v)
			}
			c.PartSize = int64(n)
		default:
			return invalid("unknown parameter %q; want endpoint, region, insecure or part_size", name)
		}
	}
	if err := c.validate(); err != nil {
		return invalid("%s", branchkey.ErrorMessage(err))
	}
	return c, nil
}

// redact removes a password from a URL for messages.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

// validate checks what can be checked without the server. EINVALID.
func (c Config) validate() error {
	if c.Bucket == "" {
		return branchkey.Errorf(branchkey.EINVALID, "no bucket is named")
	}
	if err := s3utils.CheckValidBucketNameStrict(c.Bucket); err != nil {
		return branchkey.Errorf(branchkey.EINVALID, "bucket name %q: %v", c.Bucket, err)
	}
	if c.Prefix != "" {
		if err := branchkey.ValidBlobKey(c.Prefix); err != nil {
			return branchkey.Errorf(branchkey.EINVALID, "key prefix: %s", branchkey.ErrorMessage(err))
		}
	}
	if c.Endpoint != "" {
		if strings.Contains(c.Endpoint, "://") || strings.ContainsAny(c.Endpoint, "/?#@") {
			return branchkey.Errorf(branchkey.EINVALID, "endpoint %q is not HOST[:PORT] (for plain HTTP, set insecure)", c.Endpoint)
		}
	}
	if c.PartSize != 0 && (c.PartSize < MinPartSize || c.PartSize > MaxPartSize) {
		return branchkey.Errorf(branchkey.EINVALID, "part size %d is not between %d (5 MiB) and %d (5 GiB)", c.PartSize, MinPartSize, MaxPartSize)
	}
	return nil
}

// BlobStore stores blobs as objects in an S3 bucket. It is safe for
// concurrent use, also by several processes sharing the bucket.
type BlobStore struct {
	client   *minio.Client
	core     minio.Core // the same client, for GETs that return the body
	bucket   string
	prefix   string // "" or ending in '/'
	partSize int64
	name     string
}

// New returns a BlobStore for the bucket c names, after checking that the
// bucket exists. EINVALID for a bad Config, EUNAVAILABLE when the server
// cannot be reached.
func New(ctx context.Context, c Config) (*BlobStore, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.AccessKey == "" || c.SecretKey == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "blob store %s: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", c)
	}
	endpoint := c.Endpoint
	if endpoint == "" {
		endpoint = DefaultEndpoint
	}
	client, err := minio.New(endpoint, &minio.Options{
		Creds:      credentials.NewStaticV4(c.AccessKey, c.SecretKey, c.SessionToken),
		Secure:     !c.Insecure,
		Region:     c.Region,
		MaxRetries: maxRetries,
	})
	if err != nil {
		return nil, fmt.Errorf("blob store %s: %w", c, err)
	}
	s := &BlobStore{
		client:   client,
		core:     minio.Core{Client: client},
		bucket:   c.Bucket,
		partSize: c.PartSize,
		name:     c.String(),
	}
	if s.partSize == 0 {
		s.partSize = DefaultPartSize
	}
	if c.Prefix != "" {
		s.prefix = c.Prefix + "/"
	}
	ok, err := client.BucketExists(ctx, c.Bucket)
	if err != nil {
		return nil, fmt.Errorf("blob store %s: check the bucket: %w", s.name, mapError(err))
	}
	if !ok {
		return nil, fmt.Errorf("blob store %s: bucket %q does not exist", s.name, c.Bucket)
	}
	return s, nil
}

// String describes the store, without credentials, for logs.
func (s *BlobStore) String() string { return s.name }

// object is the object name of a valid key.
func (s *BlobStore) object(key string) string { return s.prefix + key }

// putOptions are the options of every upload.
func (s *BlobStore) putOptions() minio.PutObjectOptions {
	return minio.PutObjectOptions{
		ContentType: "application/octet-stream",
		PartSize:    uint64(s.partSize),
	}
}

// Create starts a blob under key; see the package doc for how it streams.
// ctx governs the whole write: once it is done, Write and Commit fail and
// the upload is aborted. EINVALID for a bad key.
func (s *BlobStore) Create(ctx context.Context, key string) (branchkey.BlobWriter, error) {
	if err := branchkey.ValidBlobKey(key); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("create blob %s: %w", key, err)
	}
	return &writer{ctx: ctx, s: s, key: key}, nil
}

// Open opens the blob under key, reading its size and ETag; its reads run
// within ctx. ENOTFOUND if there is none, EINVALID for a bad key,
// EUNAVAILABLE when the server cannot be reached.
func (s *BlobStore) Open(ctx context.Context, key string) (branchkey.Blob, error) {
	if err := branchkey.ValidBlobKey(key); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open blob %s: %w", key, err)
	}
	info, err := s.client.StatObject(ctx, s.bucket, s.object(key), minio.StatObjectOptions{})
	if err != nil {
		if isNotFound(err) {
			return nil, branchkey.Errorf(branchkey.ENOTFOUND, "blob %q not found", key)
		}
		return nil, fmt.Errorf("open blob %s: %w", key, mapError(err))
	}
	return &blob{ctx: ctx, s: s, key: key, size: info.Size, etag: info.ETag}, nil
}

// Delete removes the blob under key; a missing key is not an error.
// EINVALID for a bad key, EUNAVAILABLE when the server cannot be reached.
func (s *BlobStore) Delete(ctx context.Context, key string) error {
	if err := branchkey.ValidBlobKey(key); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("delete blob %s: %w", key, err)
	}
	err := s.client.RemoveObject(ctx, s.bucket, s.object(key), minio.RemoveObjectOptions{})
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("delete blob %s: %w", key, mapError(err))
	}
	return nil
}

// isNotFound reports whether err is S3's answer for a missing object.
func isNotFound(err error) bool {
	var er minio.ErrorResponse
	return errors.As(err, &er) && (er.Code == minio.NoSuchKey || er.StatusCode == http.StatusNotFound && er.Code != minio.NoSuchBucket)
}

// mapError gives errors that mean something to a caller a domain code,
// keeping the original error in the chain for the logs.
func mapError(err error) error {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var e *branchkey.Error
	if errors.As(err, &e) {
		return err
	}
	var er minio.ErrorResponse
	if errors.As(err, &er) {
		if er.StatusCode >= 500 || er.StatusCode == http.StatusTooManyRequests ||
			er.Code == "SlowDown" || er.Code == "RequestTimeout" || er.Code == "ServiceUnavailable" {
			return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.EUNAVAILABLE, "the blob storage is unavailable or busy; retry later"), err)
		}
		return err
	}
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.EUNAVAILABLE, "the blob storage cannot be reached; retry later"), err)
	}
	return err
}

// errAborted ends the upload of an aborted writer.
var errAborted = errors.New("blob aborted")

// The states of a writer.
const (
	writing = iota
	committed
	aborted // by Abort, or by a failure
)

// writer is a BlobWriter. It buffers the blob's first part; once the blob
// outgrows it, the bytes stream through a pipe into a multipart upload that
// a goroutine runs.
type writer struct {
	ctx   context.Context
	s     *BlobStore
	key   string
	state int
	// buf holds the bytes until they outgrow one part; nil once streaming.
	buf []byte

	// Set once streaming.
	pw     *io.PipeWriter
	cancel context.CancelFunc // cancels the upload's requests
	stop   func() bool        // unregisters the context watch
	done   chan struct{}      // closed when the upload returned
	err    error              // the upload's error, set before done closes
}

// Write appends p to the blob. It fails once the writer's context is done
// or the upload failed; the upload is then aborted.
func (w *writer) Write(p []byte) (int, error) {
	if w.state != writing {
		return 0, fmt.Errorf("write blob %s: %w", w.key, os.ErrClosed)
	}
	if err := w.ctx.Err(); err != nil {
		_ = w.Abort()
		return 0, fmt.Errorf("write blob %s: %w", w.key, err)
	}
	if w.pw == nil {
		if int64(len(w.buf)+len(p)) <= w.s.partSize {
			w.buf = append(w.buf, p...)
			return len(p), nil
		}
		w.stream()
	}
	n, err := w.pw.Write(p)
	if err != nil {
		// The upload ended early: it failed, or the context was cancelled.
		<-w.done
		w.finish()
		w.state = aborted
		if w.err != nil {
			err = w.err
		}
		return n, fmt.Errorf("write blob %s: %w", w.key, mapError(err))
	}
	return n, nil
}

// stream starts the multipart upload, fed first with the buffered bytes and
// then with what Write puts in the pipe.
func (w *writer) stream() {
	pr, pw := io.Pipe()
	// The buffer is referenced only through the reader, which the
	// MultiReader drops once it is read, so its memory is freed while the
	// upload goes on.
	r := io.MultiReader(bytes.NewReader(w.buf), pr)
	w.buf = nil
	ctx, cancel := context.WithCancel(w.ctx)
	w.pw, w.cancel, w.done = pw, cancel, make(chan struct{})
	// A cancelled context ends the upload even while nobody calls the
	// writer: the upload reads an error from the pipe and aborts.
	w.stop = context.AfterFunc(w.ctx, func() { pw.CloseWithError(context.Cause(w.ctx)) })
	go func() {
		defer close(w.done)
		// minio-go aborts the multipart upload, with a context of its own,
		// when it returns an error: a read error from the pipe, a failed
		// request or a cancelled context.
		_, err := w.s.client.PutObject(ctx, w.s.bucket, w.s.object(w.key), r, -1, w.s.putOptions())
		w.err = err
		if err == nil {
			err = io.ErrClosedPipe
		}
		pr.CloseWithError(err) // a Write waiting on the pipe returns
	}()
}

// finish releases what streaming holds, once the upload returned.
func (w *writer) finish() {
	w.stop()
	w.cancel()
}

// Commit uploads what is buffered, or completes the multipart upload, and
// returns once the object is stored: then it is visible and durable. On
// failure nothing is published.
func (w *writer) Commit() error {
	switch w.state {
	case committed:
		return nil
	case aborted:
		return fmt.Errorf("commit blob %s: %w", w.key, os.ErrClosed)
	}
	if err := w.ctx.Err(); err != nil {
		_ = w.Abort()
		return fmt.Errorf("commit blob %s: %w", w.key, err)
	}
	if w.pw == nil {
		buf := w.buf
		w.buf = nil
		opts := w.s.putOptions()
		if len(buf) == 0 {
			// minio-go signs an empty body over plain HTTP as a stream
			// of unknown length, sent chunked, which servers that insist
			// on Content-Length refuse. An empty body needs no payload
			// signature.
			opts.DisableContentSha256 = true
		}
		if _, err := w.s.client.PutObject(w.ctx, w.s.bucket, w.s.object(w.key), bytes.NewReader(buf), int64(len(buf)), opts); err != nil {
			w.state = aborted
			return fmt.Errorf("commit blob %s: %w", w.key, mapError(err))
		}
		w.state = committed
		return nil
	}
	_ = w.pw.Close()
	<-w.done
	w.finish()
	if w.err != nil {
		w.state = aborted
		return fmt.Errorf("commit blob %s: %w", w.key, mapError(w.err))
	}
	w.state = committed
	return nil
}

// Abort discards the blob: the buffer, or the multipart upload with the
// parts already sent. It returns once the upload has ended. It is a no-op
// after Commit or Abort.
func (w *writer) Abort() error {
	if w.state != writing {
		return nil
	}
	w.state = aborted
	w.buf = nil
	if w.pw != nil {
		w.pw.CloseWithError(errAborted)
		w.cancel() // a part on its way need not finish
		<-w.done
		w.finish()
	}
	return nil
}

// blob is an open object of a known size and ETag. Read streams from one GET
// that Seek replaces; ReadAt makes a ranged GET of its own, so that ReadAt
// calls may run in parallel with each other.
type blob struct {
	ctx  context.Context
	s    *BlobStore
	key  string
	size int64
	etag string

	mu      sync.Mutex // guards what follows
	off     int64      // the offset of the next Read
	body    io.ReadCloser
	bodyOff int64 // the offset body reads next
	closed  bool
}

// get opens the object's bytes [off, end] (end inclusive), failing if the
// object is no longer the one opened.
func (b *blob) get(off, end int64) (io.ReadCloser, error) {
	opts := minio.GetObjectOptions{}
	if err := opts.SetRange(off, end); err != nil {
		return nil, err
	}
	if b.etag != "" {
		if err := opts.SetMatchETag(b.etag); err != nil {
			return nil, err
		}
	}
	body, _, _, err := b.s.core.GetObject(b.ctx, b.s.bucket, b.s.object(b.key), opts)
	if err != nil {
		var er minio.ErrorResponse
		if errors.As(err, &er) && (er.StatusCode == http.StatusPreconditionFailed || isNotFound(err)) {
			return nil, fmt.Errorf("read blob %s: it was replaced or deleted since it was opened: %w", b.key, err)
		}
		return nil, fmt.Errorf("read blob %s: %w", b.key, mapError(err))
	}
	return body, nil
}

// Read reads the next bytes of the blob.
func (b *blob) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, fmt.Errorf("read blob %s: %w", b.key, os.ErrClosed)
	}
	if b.off >= b.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if b.body != nil && b.bodyOff != b.off {
		b.closeBody()
	}
	if b.body == nil {
		body, err := b.get(b.off, b.size-1)
		if err != nil {
			return 0, err
		}
		b.body, b.bodyOff = body, b.off
	}
	n, err := b.body.Read(p[:min(int64(len(p)), b.size-b.off)])
	b.off += int64(n)
	b.bodyOff += int64(n)
	if err == io.EOF {
		b.closeBody()
		if b.off < b.size {
			return n, fmt.Errorf("read blob %s: %w", b.key, io.ErrUnexpectedEOF)
		}
		return n, nil
	} else if err != nil {
		b.closeBody()
		return n, fmt.Errorf("read blob %s: %w", b.key, mapError(err))
	}
	return n, nil
}

func (b *blob) closeBody() {
	if b.body != nil {
		_ = b.body.Close()
		b.body = nil
	}
}

// ReadAt reads len(p) bytes at off, or what there is up to the end and
// io.EOF. It does not use or move the offset of Read.
func (b *blob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read blob %s at %d: negative offset", b.key, off)
	}
	b.mu.Lock()
	closed := b.closed
	b.mu.Unlock()
	if closed {
		return 0, fmt.Errorf("read blob %s: %w", b.key, os.ErrClosed)
	}
	if off >= b.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	want := min(int64(len(p)), b.size-off)
	body, err := b.get(off, off+want-1)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	n, err := io.ReadFull(body, p[:want])
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the object is shorter than it was
		}
		return n, fmt.Errorf("read blob %s at %d: %w", b.key, off, mapError(err))
	}
	if want < int64(len(p)) {
		return n, io.EOF
	}
	return n, nil
}

// Seek sets the offset of the next Read. An offset past the end is allowed;
// Read then returns io.EOF.
func (b *blob) Seek(offset int64, whence int) (int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = b.off + offset
	case io.SeekEnd:
		abs = b.size + offset
	default:
		return 0, fmt.Errorf("seek blob %s: invalid whence %d", b.key, whence)
	}
	if abs < 0 {
		return 0, fmt.Errorf("seek blob %s: negative position %d", b.key, abs)
	}
	b.off = abs
	return abs, nil
}

// Close ends the blob's open GET.
func (b *blob) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	b.closeBody()
	return nil
}

// Size is the blob's length in bytes when it was opened.
func (b *blob) Size() int64 { return b.size }
