// Package s3test runs an S3-protocol server for tests: gofakes3 with its
// in-memory backend (github.com/johannesboyne/gofakes3, MIT, maintained, on
// the Go module proxy; Debian packages no S3 server and MinIO's is AGPL),
// plus the one thing it lacks for minio-go over plain HTTP: decoding
// aws-chunked multipart parts. Only tests import it.
package s3test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// Handler returns an in-memory S3 server holding the given buckets.
func Handler(buckets ...string) (http.Handler, error) {
	backend := s3mem.New()
	for _, b := range buckets {
		if err := backend.CreateBucket(b); err != nil {
			return nil, fmt.Errorf("create bucket %s: %w", b, err)
		}
	}
	return DecodeChunkedParts(gofakes3.New(backend).Server()), nil
}

// Start serves Handler(buckets...) on 127.0.0.1 until the test ends and
// returns its host:port.
func Start(tb testing.TB, buckets ...string) string {
	tb.Helper()
	h, err := Handler(buckets...)
	if err != nil {
		tb.Fatal(err)
	}
	srv := httptest.NewServer(h)
	tb.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// DecodeChunkedParts makes up for what gofakes3 v1.2.0 lacks: it decodes
// aws-chunked bodies (the streaming SigV4 payload minio-go sends over plain
// HTTP) for PutObject but not for UploadPart, and would store the chunk
// headers in the part. This decodes them first, as S3 does.
func DecodeChunkedParts(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut && r.URL.Query().Has("uploadId") &&
			r.Header.Get("X-Amz-Content-Sha256") == "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" {
			raw, err := io.ReadAll(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			body, err := decodeAWSChunked(raw)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if want := r.Header.Get("X-Amz-Decoded-Content-Length"); want != strconv.Itoa(len(body)) {
				http.Error(w, fmt.Sprintf("decoded %d bytes, the header says %s", len(body), want), http.StatusBadRequest)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			r.ContentLength = int64(len(body))
			r.Header.Set("Content-Length", strconv.Itoa(len(body)))
			r.Header.Set("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD")
		}
		next.ServeHTTP(w, r)
	})
}

// decodeAWSChunked decodes an aws-chunked body: chunks of
// "HEXSIZE;chunk-signature=SIG\r\nDATA\r\n", the last one empty.
func decodeAWSChunked(raw []byte) ([]byte, error) {
	var out []byte
	for {
		header, rest, ok := bytes.Cut(raw, []byte("\r\n"))
		if !ok {
			return nil, errors.New("aws-chunked: a chunk header has no CRLF")
		}
		sizeHex, _, _ := bytes.Cut(header, []byte(";"))
		size, err := strconv.ParseInt(string(sizeHex), 16, 64)
		if err != nil || size < 0 || size+2 > int64(len(rest)) {
			return nil, fmt.Errorf("aws-chunked: bad chunk header %q", header)
		}
		if size == 0 {
			return out, nil
		}
		out = append(out, rest[:size]...)
		if !bytes.HasPrefix(rest[size:], []byte("\r\n")) {
			return nil, errors.New("aws-chunked: a chunk does not end in CRLF")
		}
		raw = rest[size+2:]
	}
}
