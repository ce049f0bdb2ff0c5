package s3_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/branchkey/branchkey/s3/s3test"
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
	handler, err := s3test.Handler(testBucket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr().String())
	go func() { _ = http.Serve(ln, handler) }()
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}
