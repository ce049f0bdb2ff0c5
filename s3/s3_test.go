package s3_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	mrand "math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/blobtest"
	"github.com/branchkey/branchkey/s3"
)

// testConfig is a Config for the test server, with a key prefix no other
// test uses.
func testConfig(tb testing.TB) s3.Config {
	tb.Helper()
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		tb.Fatal(err)
	}
	return s3.Config{
		Endpoint: endpoint, Bucket: testBucket, Prefix: "test-" + hex.EncodeToString(b[:]),
		Region: "us-east-1", AccessKey: "test-access", SecretKey: "test-secret", Insecure: true,
	}
}

// MustNew returns a BlobStore on the test server.
func MustNew(tb testing.TB, c s3.Config) *s3.BlobStore {
	tb.Helper()
	bs, err := s3.New(context.Background(), c)
	if err != nil {
		tb.Fatal(err)
	}
	return bs
}

// rawClient is a client of the test server, to look behind the BlobStore.
func rawClient(tb testing.TB) *minio.Client {
	tb.Helper()
	c, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4("test-access", "test-secret", ""), Region: "us-east-1"})
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

func TestBlobStore(t *testing.T) {
	blobtest.Run(t, func(tb testing.TB) branchkey.BlobStore { return MustNew(tb, testConfig(tb)) })
}

// TestBlobStoreSmallParts runs the suite with the smallest part size, so
// that its larger blobs take the multipart path.
func TestBlobStoreSmallParts(t *testing.T) {
	blobtest.Run(t, func(tb testing.TB) branchkey.BlobStore {
		c := testConfig(tb)
		c.PartSize = s3.MinPartSize
		return MustNew(tb, c)
	})
}

// TestLayout pins that a blob is the object PREFIX/KEY, so operators find
// blobs where they expect them.
func TestLayout(t *testing.T) {
	ctx := context.Background()
	c := testConfig(t)
	bs := MustNew(t, c)
	if _, err := branchkey.PutBlob(ctx, bs, "aggregates/t1/b1/a1.npy", strings.NewReader("agg")); err != nil {
		t.Fatal(err)
	}
	obj, err := rawClient(t).GetObject(ctx, testBucket, c.Prefix+"/aggregates/t1/b1/a1.npy", minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	got, err := io.ReadAll(obj)
	if err != nil || string(got) != "agg" {
		t.Fatalf("the object PREFIX/KEY holds %q, %v; want agg", got, err)
	}
}

// patterned is a reader of n deterministic pseudo-random bytes that holds
// none of them in memory, and hashes what it gave out.
type patterned struct {
	rng  *mrand.Rand
	left int64
	sum  io.Writer
}

func (p *patterned) Read(b []byte) (int, error) {
	if p.left == 0 {
		return 0, io.EOF
	}
	b = b[:min(int64(len(b)), p.left)]
	for i := range b {
		b[i] = byte(p.rng.Uint32())
	}
	p.left -= int64(len(b))
	_, _ = p.sum.Write(b)
	return len(b), nil
}

// liveHeap returns the bytes of live heap objects after a collection.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestMultipartBoundedMemory streams a blob of many parts and checks that
// the writer's memory stays within a few parts however large the blob is,
// and that the object is the multipart upload of those parts, byte for byte.
func TestMultipartBoundedMemory(t *testing.T) {
	ctx := context.Background()
	c := testConfig(t)
	c.PartSize = s3.MinPartSize
	bs := MustNew(t, c)
	const parts = 12
	size := parts*c.PartSize + 12345 // 13 parts, the last a short one

	base := liveHeap()
	var mu sync.Mutex
	peak := base
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			h := liveHeap()
			mu.Lock()
			peak = max(peak, h)
			mu.Unlock()
		}
	}()
	h := sha256.New()
	w, err := bs.Create(ctx, "updates/big.npy")
	if err != nil {
		t.Fatal(err)
	}
	src := &patterned{rng: mrand.New(mrand.NewPCG(3, 4)), left: size, sum: h}
	object := c.Prefix + "/updates/big.npy"
	// Half way, the parts written so far are on the server already, in a
	// multipart upload in progress.
	n, err := io.CopyBuffer(w, io.LimitReader(src, size/2), make([]byte, 256<<10))
	if err != nil {
		_ = w.Abort()
		t.Fatal(err)
	}
	if got := uploadedParts(t, object); got < parts/2-2 {
		t.Fatalf("%d parts uploaded after writing %d bytes, want at least %d", got, n, parts/2-2)
	}
	m, err := io.CopyBuffer(w, src, make([]byte, 256<<10))
	n += m
	if err != nil {
		_ = w.Abort()
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	close(stop)
	<-sampled
	if n != size {
		t.Fatalf("wrote %d bytes, want %d", n, size)
	}
	grew := int64(peak) - int64(base)
	t.Logf("a %d MiB blob in %d MiB parts: live heap grew by %.1f MiB at most", size>>20, c.PartSize>>20, float64(grew)/(1<<20))
	if limit := 4 * c.PartSize; grew > limit {
		t.Fatalf("live heap grew by %d bytes while streaming %d, more than 4 parts (%d): memory is not bounded", grew, size, limit)
	}

	info, err := rawClient(t).StatObject(ctx, testBucket, object, minio.StatObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != size {
		t.Fatalf("object size %d, want %d", info.Size, size)
	}
	if ups := incomplete(t, object); len(ups) != 0 {
		t.Fatalf("uploads still in progress after the commit: %v", ups)
	}

	b, err := bs.Open(ctx, "updates/big.npy")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got := sha256.New()
	if _, err := io.CopyBuffer(got, b, make([]byte, 100_003)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Sum(nil), h.Sum(nil)) {
		t.Fatal("the blob read back differs from what was written")
	}
}

// uploadedParts returns how many parts the one multipart upload in progress
// for object holds.
func uploadedParts(t *testing.T, object string) int {
	t.Helper()
	ctx := context.Background()
	core := minio.Core{Client: rawClient(t)}
	var id string
	for u := range core.ListIncompleteUploads(ctx, testBucket, object, false) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		if u.Key == object {
			id = u.UploadID
		}
	}
	if id == "" {
		t.Fatalf("no multipart upload of %s is in progress", object)
	}
	res, err := core.ListObjectParts(ctx, testBucket, object, id, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	return len(res.ObjectParts)
}

// incomplete lists the multipart uploads in progress under prefix.
func incomplete(t *testing.T, prefix string) []string {
	t.Helper()
	var keys []string
	for u := range rawClient(t).ListIncompleteUploads(context.Background(), testBucket, prefix, true) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		keys = append(keys, u.Key)
	}
	return keys
}

// TestAbortMultipart aborts writers that already sent parts, by Abort and by
// cancelling their context: no object appears, an older blob under the key
// stays, and no upload is left in progress holding the parts.
func TestAbortMultipart(t *testing.T) {
	c := testConfig(t)
	c.PartSize = s3.MinPartSize
	bs := MustNew(t, c)
	data := make([]byte, 2*c.PartSize+c.PartSize/2)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		before []byte // the blob under the key before, if any
		stop   func(w branchkey.BlobWriter, cancel context.CancelFunc) error
	}{
		{"Abort", nil, func(w branchkey.BlobWriter, _ context.CancelFunc) error { return w.Abort() }},
		{"AbortReplacement", []byte("old"), func(w branchkey.BlobWriter, _ context.CancelFunc) error { return w.Abort() }},
		{"CancelThenCommit", nil, func(w branchkey.BlobWriter, cancel context.CancelFunc) error {
			cancel()
			if err := w.Commit(); err == nil {
				t.Error("Commit after the context was cancelled succeeded")
			}
			return w.Abort()
		}},
		{"CancelUnattended", nil, func(w branchkey.BlobWriter, cancel context.CancelFunc) error {
			// Nobody calls the writer after the cancel; the upload must
			// end by itself. Abort then only waits for it.
			cancel()
			time.Sleep(100 * time.Millisecond)
			return w.Abort()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			key := "updates/" + strings.ToLower(tt.name) + ".npy"
			if tt.before != nil {
				if _, err := branchkey.PutBlob(ctx, bs, key, bytes.NewReader(tt.before)); err != nil {
					t.Fatal(err)
				}
			}
			w, err := bs.Create(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(data); err != nil {
				t.Fatal(err)
			}
			// Two parts are sent (or on their way); the third is still
			// being written when the writer stops.
			var parts int
			for range 100 {
				ups := incomplete(t, c.Prefix+"/"+key)
				if len(ups) == 1 {
					parts = 1
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			if parts == 0 {
				t.Fatal("no multipart upload is in progress after writing 2.5 parts")
			}
			if err := tt.stop(w, cancel); err != nil {
				t.Fatal(err)
			}
			b, err := bs.Open(context.Background(), key)
			if tt.before == nil {
				if branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
					t.Fatalf("Open after the abort = %v, want ENOTFOUND", err)
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				got, _ := io.ReadAll(b)
				b.Close()
				if !bytes.Equal(got, tt.before) {
					t.Fatalf("after an aborted replacement read %q, want the old blob", got)
				}
			}
			if ups := incomplete(t, c.Prefix+"/"+key); len(ups) != 0 {
				t.Fatalf("uploads still in progress after the abort: %v", ups)
			}
		})
	}
}

// TestReadAtParallel pins that ReadAt calls on one blob may run at once, as
// io.ReaderAt allows, alongside sequential Reads.
func TestReadAtParallel(t *testing.T) {
	ctx := context.Background()
	bs := MustNew(t, testConfig(t))
	data := make([]byte, 1<<20)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if _, err := branchkey.PutBlob(ctx, bs, "a/b.npy", bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	b, err := bs.Open(ctx, "a/b.npy")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var wg sync.WaitGroup
	errs := make(chan string, 64)
	for i := range 16 {
		wg.Go(func() {
			off := int64(i) * 60_000
			p := make([]byte, 70_000)
			if _, err := b.ReadAt(p, off); err != nil {
				errs <- err.Error()
			} else if !bytes.Equal(p, data[off:off+70_000]) {
				errs <- "ReadAt bytes differ"
			}
		})
	}
	all, err := io.ReadAll(b)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if err != nil || !bytes.Equal(all, data) {
		t.Fatalf("sequential read alongside ReadAt: %v", err)
	}
}

// TestUnreachable pins that a server nobody listens for is EUNAVAILABLE,
// from New and from each call, so that callers know to retry.
func TestUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	c := testConfig(t)
	c.Endpoint = closed
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s3.New(ctx, c); branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("New = %v, want EUNAVAILABLE", err)
	}

	// A store whose server went away after New.
	good := testConfig(t)
	proxy := newProxy(t, endpoint)
	good.Endpoint = proxy.addr
	bs := MustNew(t, good)
	if _, err := branchkey.PutBlob(ctx, bs, "x/y.npy", strings.NewReader("x")); err != nil {
		t.Fatal(err)
	}
	proxy.close()
	if _, err := bs.Open(ctx, "x/y.npy"); branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("Open = %v, want EUNAVAILABLE", err)
	}
	if err := bs.Delete(ctx, "x/y.npy"); branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("Delete = %v, want EUNAVAILABLE", err)
	}
	w, err := bs.Create(ctx, "x/z.npy")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("z")); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("Commit = %v, want EUNAVAILABLE", err)
	}
}

// proxy forwards TCP connections to a server until it is closed, when it
// drops them all and refuses new ones.
type proxy struct {
	addr  string
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{addr: ln.Addr().String(), ln: ln}
	t.Cleanup(p.close)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { _, _ = io.Copy(up, c); up.Close() }()
			go func() { _, _ = io.Copy(c, up); c.Close() }()
		}
	}()
	return p
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// TestNewChecks pins New's refusals: no credentials, a missing bucket.
func TestNewChecks(t *testing.T) {
	ctx := context.Background()
	c := testConfig(t)
	c.AccessKey = ""
	if _, err := s3.New(ctx, c); branchkey.ErrorCode(err) != branchkey.EINVALID {
		t.Fatalf("New without credentials = %v, want EINVALID", err)
	}
	c = testConfig(t)
	c.Bucket = "no-such-bucket"
	_, err := s3.New(ctx, c)
	if err == nil || !strings.Contains(err.Error(), `bucket "no-such-bucket" does not exist`) {
		t.Fatalf("New with a missing bucket = %v", err)
	}
	c = testConfig(t)
	c.PartSize = 1 << 20
	if _, err := s3.New(ctx, c); branchkey.ErrorCode(err) != branchkey.EINVALID {
		t.Fatalf("New with 1 MiB parts = %v, want EINVALID", err)
	}
}

func TestParseURL(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKID")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "SECRET")
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_REGION", "")
	good := []struct {
		name string
		url  string
		want s3.Config
	}{
		{"BucketOnly", "s3://models", s3.Config{Bucket: "models"}},
		{"Prefix", "s3://models/branchkey/prod/", s3.Config{Bucket: "models", Prefix: "branchkey/prod"}},
		{"Local", "s3://models/bk?endpoint=127.0.0.1:9000&region=us-east-1&insecure=true",
			s3.Config{Bucket: "models", Prefix: "bk", Endpoint: "127.0.0.1:9000", Region: "us-east-1", Insecure: true}},
		{"PartSize", "s3://models?part_size=64MiB", s3.Config{Bucket: "models", PartSize: 64 << 20}},
		{"PartSizeBytes", "s3://models?part_size=5242880", s3.Config{Bucket: "models", PartSize: 5 << 20}},
	}
	for _, tt := range good {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s3.ParseURL(tt.url)
			if err != nil {
				t.Fatal(err)
			}
			want := tt.want
			want.AccessKey, want.SecretKey = "AKID", "SECRET"
			if got != want {
				t.Fatalf("ParseURL(%q) = %+v, want %+v", tt.url, got, want)
			}
			if strings.Contains(got.String(), "SECRET") || strings.Contains(got.String(), "AKID") {
				t.Fatalf("String() = %q shows the credentials", got.String())
			}
			again, err := s3.ParseURL(got.String())
			if err != nil || again != got {
				t.Fatalf("ParseURL(String()) = %+v, %v; want %+v", again, err, got)
			}
		})
	}
	t.Run("RegionFromEnv", func(t *testing.T) {
		t.Setenv("AWS_REGION", "eu-west-1")
		got, err := s3.ParseURL("s3://models")
		if err != nil || got.Region != "eu-west-1" {
			t.Fatalf("ParseURL = %+v, %v; want region eu-west-1", got, err)
		}
	})
	bad := []struct {
		name, url, msg string
	}{
		{"Scheme", "file:///tmp/x", "scheme is not s3"},
		{"NoBucket", "s3:///prefix", "no bucket"},
		{"BadBucket", "s3://Bad_Bucket", "bucket name"},
		{"Credentials", "s3://key:secret@models", "credentials do not belong in the URL"},
		{"UnknownParam", "s3://models?endpont=x", `unknown parameter "endpont"`},
		{"Twice", "s3://models?region=a&region=b", "region is given 2 times"},
		{"Insecure", "s3://models?insecure=maybe", "insecure"},
		{"EndpointScheme", "s3://models?endpoint=http://127.0.0.1:9000", "not HOST[:PORT]"},
		{"PrefixDotDot", "s3://models/a/../b", `".." segment`},
		{"PartSizeSmall", "s3://models?part_size=1MiB", "part size"},
		{"PartSizeJunk", "s3://models?part_size=lots", "part_size"},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s3.ParseURL(tt.url)
			if branchkey.ErrorCode(err) != branchkey.EINVALID || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("ParseURL(%q) = %v, want EINVALID mentioning %q", tt.url, err, tt.msg)
			}
			if strings.Contains(err.Error(), "secret@") {
				t.Fatalf("error %q shows the password", err)
			}
		})
	}
}
