package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/weights"
)

// MustWeights writes a weights file of about size bytes (one float32
// tensor) into dir. A sparse file holds zeros and costs no disk writes; a
// dense one holds a pattern.
func MustWeights(tb testing.TB, dir, name string, size int64, sparse bool) string {
	tb.Helper()
	path := filepath.Join(dir, name)
	f, err := os.Create(path)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	n := size / 4
	var w io.Writer = f
	if sparse {
		w = &holeWriter{f: f}
	}
	enc, err := weights.NewEncoder(w, 100, []weights.Tensor{{DType: weights.Float32, Shape: []int{int(n)}}})
	if err != nil {
		tb.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	if !sparse {
		for i := range chunk {
			chunk[i] = byte(i % 61) // finite float32s
		}
	}
	for left := n * 4; left > 0; left -= int64(len(chunk)) {
		if _, err := enc.Write(chunk[:min(int64(len(chunk)), left)]); err != nil {
			tb.Fatal(err)
		}
	}
	if err := enc.Close(); err != nil {
		tb.Fatal(err)
	}
	return path
}

// holeWriter seeks over all-zero writes, leaving holes in a sparse file.
type holeWriter struct{ f *os.File }

func (h *holeWriter) Write(p []byte) (int, error) {
	for _, b := range p {
		if b != 0 {
			return h.f.Write(p)
		}
	}
	_, err := h.f.Seek(int64(len(p)), io.SeekCurrent)
	return len(p), err
}

// cutProxy forwards TCP connections to a server and breaks one exchange
// once: the first upload or download after Arm.
type cutProxy struct {
	ln     net.Listener
	target string
	// marker starts the request to break ("POST /v1/file/upload").
	marker []byte
	// request: cut after this many bytes of the request were forwarded;
	// response: cut when the response starts (the 201 never reaches the
	// client), or after this many response bytes when positive.
	mode  string
	after int64

	armed    atomic.Bool
	requests atomic.Int32 // requests with the marker seen
	cuts     atomic.Int32
	wg       sync.WaitGroup
}

// MustCutProxy starts a proxy to target's host, closed at cleanup.
func MustCutProxy(tb testing.TB, target, marker, mode string, after int64) *cutProxy {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	p := &cutProxy{ln: ln, target: strings.TrimPrefix(target, "http://"), marker: []byte(marker), mode: mode, after: after}
	p.armed.Store(true)
	p.wg.Add(1)
	go p.serve()
	tb.Cleanup(func() {
		ln.Close()
		p.wg.Wait()
	})
	return p
}

// URL is the proxy's base URL.
func (p *cutProxy) URL() string { return "http://" + p.ln.Addr().String() }

func (p *cutProxy) serve() {
	defer p.wg.Done()
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		var once sync.Once
		kill := func() {
			once.Do(func() {
				// An abortive close: the peers see a reset.
				c.(*net.TCPConn).SetLinger(0)
				up.(*net.TCPConn).SetLinger(0)
				c.Close()
				up.Close()
			})
		}
		var inRequest atomic.Bool
		var sent, received atomic.Int64
		conns.Add(2)
		go func() { // client to server
			defer conns.Done()
			defer kill()
			buf := make([]byte, 32<<10)
			var tail []byte
			for {
				n, err := c.Read(buf)
				if n > 0 {
					chunk := buf[:n]
					window := append(tail, chunk...)
					if k := bytes.Count(window, p.marker); k > 0 {
						p.requests.Add(int32(k))
						if p.armed.Load() {
							inRequest.Store(true)
						}
					}
					tail = append([]byte(nil), window[max(0, len(window)-len(p.marker)):]...)
					if inRequest.Load() && p.mode == "request" && sent.Add(int64(n)) >= p.after && p.armed.CompareAndSwap(true, false) {
						p.cuts.Add(1)
						return
					}
					if _, err := up.Write(chunk); err != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
		go func() { // server to client
			defer conns.Done()
			defer kill()
			buf := make([]byte, 32<<10)
			for {
				n, err := up.Read(buf)
				if n > 0 {
					chunk := buf[:n]
					if inRequest.Load() && p.mode == "response" && !bytes.HasPrefix(chunk, []byte("HTTP/1.1 100")) &&
						received.Add(int64(n)) >= p.after && p.armed.CompareAndSwap(true, false) {
						if p.after > 0 {
							c.Write(chunk[:len(chunk)/2])
						}
						p.cuts.Add(1)
						return
					}
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// TestFileUpload_CutOff breaks an upload's connection once, mid-request or
// after the server recorded it but before the answer arrived: the client
// retries under the same idempotency key and the update counts once.
func TestFileUpload_CutOff(t *testing.T) {
	t.Parallel()
	src := MustWeights(t, t.TempDir(), "big.npy", 8<<20, false)
	for _, tc := range []struct {
		name, mode string
		after      int64
	}{
		{"CutRequest", "request", 1 << 20},
		{"LostAnswer", "response", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := MustServer(t, false)
			creds := MustBranch(t, ts, 3, 1)
			proxy := MustCutProxy(t, ts.URL, "POST /v1/file/upload", tc.mode, tc.after)
			var attempts []int
			c := MustClient(t, ts, creds[0], client.WithServer(proxy.URL()), client.WithProgress(func(p client.Progress) {
				if p.Done == 0 {
					attempts = append(attempts, p.Attempt)
				}
			}))
			ctx := ctxT(t)
			id, err := c.FileUpload(ctx, src)
			if err != nil {
				t.Fatal(err)
			}
			if proxy.cuts.Load() != 1 || proxy.requests.Load() != 2 {
				t.Fatalf("%d cuts, %d upload requests; want 1 and 2", proxy.cuts.Load(), proxy.requests.Load())
			}
			if len(attempts) == 0 || attempts[len(attempts)-1] != 2 {
				t.Errorf("progress saw attempts %v", attempts)
			}
			// Without the idempotency key, the lost answer's retry would
			// record a second update, replacing the first.
			if got := ts.Log.Count("update recorded"); got != 1 {
				t.Errorf("the server recorded %d updates, want 1", got)
			}
			b, err := ts.Admin.ShowBranch(ctx, creds[0].TreeID, creds[0].BranchID)
			if err != nil {
				t.Fatal(err)
			}
			if b.CurrentRound == nil || b.CurrentRound.Count != 1 {
				t.Fatalf("current round %+v", b.CurrentRound)
			}
			path, err := c.FileDownload(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			mustSameFile(t, path, src)
		})
	}
}

func mustSameFile(tb testing.TB, got, want string) {
	tb.Helper()
	g, err := os.ReadFile(got)
	if err != nil {
		tb.Fatal(err)
	}
	w, err := os.ReadFile(want)
	if err != nil {
		tb.Fatal(err)
	}
	if !bytes.Equal(g, w) {
		tb.Fatalf("%s (%d bytes) differs from %s (%d bytes)", got, len(g), want, len(w))
	}
}

// failFirst answers the first len(statuses) requests matching method and
// path prefix with those statuses, before the server sees them, and
// records every matching request's Range header.
type failFirst struct {
	method, prefix string
	statuses       []int
	mu             sync.Mutex
	seen           int
	ranges         []string
}

func (f *failFirst) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != f.method || !strings.HasPrefix(r.URL.Path, f.prefix) {
			next.ServeHTTP(w, r)
			return
		}
		f.mu.Lock()
		i := f.seen
		f.seen++
		f.ranges = append(f.ranges, r.Header.Get("Range"))
		f.mu.Unlock()
		if i < len(f.statuses) {
			w.Header().Set("Retry-After", "0")
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(f.statuses[i])
			io.WriteString(w, `{"code":"unavailable","message":"try later","error":"try later"}`)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// TestFileUpload_Transient retries 503, 429 and 502 answers; a 400 is not
// retried.
func TestFileUpload_Transient(t *testing.T) {
	t.Parallel()
	ff := &failFirst{method: "POST", prefix: "/v1/file/upload", statuses: []int{503, 429, 502}}
	ts := MustServer(t, false, ff.wrap)
	creds := MustBranch(t, ts, 3, 1)
	c := MustClient(t, ts, creds[0])
	ctx := ctxT(t)
	if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
		t.Fatal(err)
	}
	if ff.seen != 4 || ts.Log.Count("update recorded") != 1 {
		t.Fatalf("%d attempts, %d recorded; want 4 and 1", ff.seen, ts.Log.Count("update recorded"))
	}

	t.Run("ErrSpent", func(t *testing.T) {
		ff := &failFirst{method: "POST", prefix: "/v1/file/upload", statuses: []int{503, 503, 503}}
		ts := MustServer(t, false, ff.wrap)
		creds := MustBranch(t, ts, 3, 1)
		c := MustClient(t, ts, creds[0], client.WithRetry(client.RetryPolicy{Attempts: 3, MinBackoff: time.Millisecond}))
		_, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy"))
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 503 || e.Message != "try later" || !e.Temporary() || ff.seen != 3 {
			t.Fatalf("FileUpload = %v after %d attempts", err, ff.seen)
		}
	})
	t.Run("ErrNotRetried", func(t *testing.T) {
		ff := &failFirst{method: "POST", prefix: "/v1/file/upload", statuses: []int{400}}
		ts := MustServer(t, false, ff.wrap)
		creds := MustBranch(t, ts, 3, 1)
		_, err := MustClient(t, ts, creds[0]).FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy"))
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 400 || e.Temporary() || ff.seen != 1 {
			t.Fatalf("FileUpload = %v after %d attempts", err, ff.seen)
		}
	})
}

// TestFileDownload_Resume breaks a download mid-body: the client asks for
// the rest with Range and gets the whole file; when the server ignores the
// Range, it starts again.
func TestFileDownload_Resume(t *testing.T) {
	t.Parallel()
	src := MustWeights(t, t.TempDir(), "big.npy", 8<<20, false)
	for _, tc := range []struct {
		name       string
		stripRange bool
	}{{"Range", false}, {"RangeIgnored", true}} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &failFirst{method: "GET", prefix: "/v1/file/download/"}
			strip := func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if tc.stripRange {
						r.Header.Del("Range")
					}
					next.ServeHTTP(w, r)
				})
			}
			ts := MustServer(t, false, rec.wrap, strip)
			creds := MustBranch(t, ts, 3, 1)
			ctx := ctxT(t)
			id, err := MustClient(t, ts, creds[0]).FileUpload(ctx, src)
			if err != nil {
				t.Fatal(err)
			}
			proxy := MustCutProxy(t, ts.URL, "GET /v1/file/download/", "response", 3<<20)
			var last client.Progress
			c := MustClient(t, ts, creds[0], client.WithServer(proxy.URL()), client.WithProgress(func(p client.Progress) { last = p }))
			path, err := c.FileDownload(ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			mustSameFile(t, path, src)
			if proxy.cuts.Load() != 1 || len(rec.ranges) != 2 || rec.ranges[0] != "" || !strings.HasPrefix(rec.ranges[1], "bytes=") || rec.ranges[1] == "bytes=0-" {
				t.Fatalf("%d cuts, Range headers %q", proxy.cuts.Load(), rec.ranges)
			}
			if !last.Finished || last.Err != nil || last.Done != last.Total || last.Attempt != 2 {
				t.Errorf("last progress %+v", last)
			}
			if entries, _ := os.ReadDir(c.DownloadDir()); len(entries) != 1 {
				t.Errorf("download dir holds %v", entries)
			}
		})
	}
}

// TestFileDownload_Bad refuses what is not a weights file, an empty answer
// included, and leaves nothing behind.
func TestFileDownload_Bad(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, body string }{{"ErrEmpty", ""}, {"ErrGarbage", "not a weights file"}} {
		t.Run(tc.name, func(t *testing.T) {
			fake := func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if strings.HasPrefix(r.URL.Path, "/v1/file/download/") {
						io.WriteString(w, tc.body)
						return
					}
					next.ServeHTTP(w, r)
				})
			}
			ts := MustServer(t, false, fake)
			creds := MustBranch(t, ts, 3, 1)
			c := MustClient(t, ts, creds[0])
			_, err := c.FileDownload(ctxT(t), "abc-123")
			mustCode(t, err, branchkey.EINVALID)
			if entries, _ := os.ReadDir(c.DownloadDir()); len(entries) != 0 {
				t.Errorf("download dir holds %v", entries)
			}
		})
	}
}

// sinkServer is a stand-in for the server that holds nothing: it logs any
// leaf in, reads uploads to the end without keeping them, and serves
// downloads from a file on disk. It isolates the client's memory.
func sinkServer(tb testing.TB, serve string) string {
	tb.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("PUT /v1/leaf/login", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"data": {"id": "leaf-1", "access_token": "t", "status": "logged_in"}}`)
	})
	mux.HandleFunc("POST /v1/file/upload", func(w http.ResponseWriter, r *http.Request) {
		mr, err := r.MultipartReader()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for {
			part, err := mr.NextPart()
			if err == io.EOF {
				break
			} else if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if _, err := io.Copy(io.Discard, part); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
		}
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, `{"data": {"file_id": "file-1"}}`)
	})
	mux.HandleFunc("GET /v1/file/download/{id}", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFile(w, r, serve)
	})
	ts := httptest.NewServer(mux)
	tb.Cleanup(ts.Close)
	return ts.URL
}

// TestClient_Memory uploads and downloads a 16 MiB file and a 256 MiB
// one: the client streams, so what it allocates does not grow with the
// size. It must not run in parallel with other tests: it reads the
// process's heap statistics.
func TestClient_Memory(t *testing.T) {
	dir := t.TempDir()
	ctx := ctxT(t)
	creds := client.Credentials{LeafName: "leaf", LeafPassword: "pw", TreeID: "tree", BranchID: "branch"}
	measure := func(path string) (alloc, peak uint64) {
		c, err := client.New(creds, client.WithServer(sinkServer(t, path)), client.WithDownloadDir(t.TempDir()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		var maxInuse atomic.Uint64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			var m runtime.MemStats
			for {
				runtime.ReadMemStats(&m)
				if m.HeapInuse > maxInuse.Load() {
					maxInuse.Store(m.HeapInuse)
				}
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
		}()
		id, err := c.FileUpload(ctx, path)
		if err == nil {
			var got string
			got, err = c.FileDownload(ctx, id)
			if err == nil {
				if fi, _ := os.Stat(got); fi == nil || fi.Size() < 16<<20 {
					t.Errorf("downloaded %v", fi)
				}
			}
		}
		close(stop)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		return after.TotalAlloc - before.TotalAlloc, maxInuse.Load() - min(maxInuse.Load(), before.HeapInuse)
	}
	smallAlloc, smallPeak := measure(MustWeights(t, dir, "small.npy", 16<<20, true))
	largeAlloc, largePeak := measure(MustWeights(t, dir, "large.npy", 256<<20, true))
	t.Logf("16 MiB: allocated %d KiB, peak heap growth %d KiB; 256 MiB: allocated %d KiB, peak heap growth %d KiB",
		smallAlloc>>10, smallPeak>>10, largeAlloc>>10, largePeak>>10)
	if largeAlloc > smallAlloc+8<<20 || largePeak > 16<<20 {
		t.Errorf("moving 256 MiB allocated %d KiB (16 MiB: %d KiB) with a peak of %d KiB more heap; streaming should not grow with the size",
			largeAlloc>>10, smallAlloc>>10, largePeak>>10)
	}
}

// TestFileDownload_Cancelled stops a download halfway: the call returns
// the context's error and leaves no partial file.
func TestFileDownload_Cancelled(t *testing.T) {
	t.Parallel()
	src := MustWeights(t, t.TempDir(), "big.npy", 8<<20, false)
	ts := MustServer(t, false)
	creds := MustBranch(t, ts, 3, 1)
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	id, err := MustClient(t, ts, creds[0]).FileUpload(ctx, src)
	if err != nil {
		t.Fatal(err)
	}
	c := MustClient(t, ts, creds[0], client.WithProgress(func(p client.Progress) {
		if p.Op == "download" && p.Done > 1<<20 {
			cancel()
		}
	}))
	if _, err := c.FileDownload(ctx, id); !errors.Is(err, context.Canceled) {
		t.Fatalf("FileDownload = %v", err)
	}
	if entries, _ := os.ReadDir(c.DownloadDir()); len(entries) != 0 {
		t.Errorf("a cancelled download left %v", entries)
	}
}

// TestClient_SSEReconnect ends the event stream right after it carried an
// aggregation: the consumer reconnects with Last-Event-ID and every
// aggregation arrives once, in order.
func TestClient_SSEReconnect(t *testing.T) {
	t.Parallel()
	var cuts atomic.Int32
	cutAfterAggregation := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/v1/events" || cuts.Load() >= 2 {
				next.ServeHTTP(w, r)
				return
			}
			ctx, cancel := context.WithCancel(r.Context())
			defer cancel()
			next.ServeHTTP(&endAfter{ResponseWriter: w, marker: []byte("aggregation_status"), end: func() {
				cuts.Add(1)
				cancel()
			}}, r.WithContext(ctx))
		})
	}
	ts := MustServer(t, false, cutAfterAggregation)
	creds := MustBranch(t, ts, 1, 1)
	ctx := ctxT(t)
	c := MustClient(t, ts, creds[0])
	if err := c.Login(ctx); err != nil {
		t.Fatal(err)
	}
	var got []int
	for round := 1; round <= 3; round++ {
		if _, err := c.FileUpload(ctx, filepath.Join(fixtures, "round_0", "leaf0.npy")); err != nil {
			t.Fatal(err)
		}
		got = append(got, next(t, c, branchkey.MessageAggregationStatus, 30*time.Second).Round)
	}
	select {
	case n := <-c.Updates():
		t.Fatalf("a fourth notification: %+v", n)
	case <-time.After(500 * time.Millisecond):
	}
	if fmt.Sprint(got) != "[1 2 3]" || cuts.Load() != 2 {
		t.Fatalf("rounds %v after %d cut streams", got, cuts.Load())
	}
}

// endAfter calls end once a write carried marker.
type endAfter struct {
	http.ResponseWriter
	marker []byte
	end    func()
	once   sync.Once
}

func (e *endAfter) Write(p []byte) (int, error) {
	n, err := e.ResponseWriter.Write(p)
	if bytes.Contains(p, e.marker) {
		e.once.Do(e.end)
	}
	return n, err
}

func (e *endAfter) Unwrap() http.ResponseWriter { return e.ResponseWriter }
