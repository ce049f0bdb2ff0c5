package s3_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// serverEnv, when set to 1, makes the test binary run the fake S3 server
// instead of the tests.
const serverEnv = "BRANCHKEY_TEST_S3_SERVER"

// testBucket exists on the server from the start.
const testBucket = "branchkey-test"

// endpoint is the fake server's host:port, set by TestMain.
var endpoint string

// TestMain starts the S3 server the tests use, gofakes3 with its in-memory
// backend, as a child process (this test binary again), so that memory
// measured in this process is the client's alone. It listens on a port of
// 127.0.0.1 that the system picks and stops when this process closes its
// standard input, or exits.
func TestMain(m *testing.M) {
	if os.Getenv(serverEnv) == "1" {
		serve()
		return
	}
	stop, err := startServer()
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the S3 test server:", err)
		os.Exit(1)
	}
	code := m.Run()
	stop()
	os.Exit(code)
}

// startServer runs the server process and returns a function that stops it.
func startServer() (stop func(), err error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), serverEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	stop = func() {
		_ = stdin.Close()
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(stdout).ReadString('\n')
		line <- strings.TrimSpace(s)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	select {
	case addr := <-line:
		if _, _, err := net.SplitHostPort(addr); err != nil {
			stop()
			return nil, fmt.Errorf("the server announced %q, not an address", addr)
		}
		endpoint = addr
		return stop, nil
	case <-time.After(30 * time.Second):
		stop()
		return nil, errors.New("the server did not announce its address within 30 s")
	}
}

// serve runs the fake server until standard input closes.
func serve() {
	backend := s3mem.New()
	if err := backend.CreateBucket(testBucket); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	faker := gofakes3.New(backend)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().String())
	go func() { _ = http.Serve(ln, decodeChunkedParts(faker.Server())) }()
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}

// decodeChunkedParts makes up for what gofakes3 v1.2.0 lacks: it decodes
// aws-chunked bodies (the streaming SigV4 payload minio-go sends over plain
// HTTP) for PutObject but not for UploadPart, and would store the chunk
// headers in the part. This decodes them first, as S3 does.
func decodeChunkedParts(next http.Handler) http.Handler {
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
