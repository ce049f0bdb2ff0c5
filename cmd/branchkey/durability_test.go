package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"mime/multipart"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/weights"
)

// wireLeaf is a minimal leaf speaking the v1 API, for tests that must not
// depend on the client package.
type wireLeaf struct {
	server, name, password, tree, branch string
	id, token                            string
}

func (l *wireLeaf) login() error {
	body, _ := json.Marshal(map[string]string{"tree_id": l.tree, "branch_id": l.branch})
	req, _ := http.NewRequest("PUT", l.server+"/v1/leaf/login", bytes.NewReader(body))
	req.SetBasicAuth(l.name, l.password)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 201 {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("login: %d %s", resp.StatusCode, b)
	}
	var out struct {
		Data struct{ ID, AccessToken string } `json:"data"`
	}
	var raw struct {
		Data map[string]string `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&raw); err != nil {
		return err
	}
	out.Data.ID, out.Data.AccessToken = raw.Data["id"], raw.Data["access_token"]
	l.id, l.token = out.Data.ID, out.Data.AccessToken
	return nil
}

// upload sends a file with an idempotency key and returns the file id and
// the status (0 when no answer came).
func (l *wireLeaf) upload(data []byte, key string) (string, int, error) {
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	meta, _ := json.Marshal(map[string]string{"leaf_name": l.name, "metadata": "durability"})
	mw.WriteField("data", string(meta))
	fw, _ := mw.CreateFormFile("file", "weights.npy")
	fw.Write(data)
	mw.Close()
	req, _ := http.NewRequest("POST", l.server+"/v1/file/upload", &body)
	req.SetBasicAuth(l.id, l.token)
	req.Header.Set("Content-Type", mw.FormDataContentType())
	req.Header.Set("Idempotency-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 201 {
		return "", resp.StatusCode, fmt.Errorf("upload: %d %s", resp.StatusCode, b)
	}
	var out struct {
		Data map[string]string `json:"data"`
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return "", resp.StatusCode, err
	}
	return out.Data["file_id"], 201, nil
}

func (l *wireLeaf) download(id string) ([]byte, int, error) {
	req, _ := http.NewRequest("GET", l.server+"/v1/file/download/"+id, nil)
	req.SetBasicAuth(l.id, l.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return b, resp.StatusCode, err
}

// process is the real binary serving, which a test can kill.
type process struct {
	cmd  *exec.Cmd
	addr string
	log  *os.File
}

func freeAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startProcess runs "branchkey serve" and waits until it answers.
func startProcess(tb testing.TB, addr string, args ...string) *process {
	tb.Helper()
	logf, err := os.OpenFile(filepath.Join(tb.TempDir(), "serve.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command(mustBinary(tb), append([]string{"serve", "--addr", addr, "--log-format", "text"}, args...)...)
	cmd.Env = append(os.Environ(), "BRANCHKEY_ADMIN_TOKEN="+testAdminToken)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	p := &process{cmd: cmd, addr: addr, log: logf}
	tb.Cleanup(func() { p.kill(); logf.Close() })
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			return p
		}
		time.Sleep(20 * time.Millisecond)
	}
	b, _ := os.ReadFile(logf.Name())
	tb.Fatalf("server did not start:\n%s", b)
	return nil
}

func (p *process) url() string { return "http://" + p.addr }

// kill sends SIGKILL: no shutdown code runs.
func (p *process) kill() {
	if p.cmd.ProcessState == nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		_ = p.cmd.Wait()
	}
}

// float32Update returns an update file of n float32 parameters in two
// tensors, with values derived from seed, and the values.
func float32Update(tb testing.TB, samples int64, n int, seed uint64) ([]byte, []float32) {
	tb.Helper()
	r := mrand.New(mrand.NewPCG(seed, 7))
	vals := make([]float32, n)
	data := make([]byte, 4*n)
	for i := range vals {
		vals[i] = float32(r.NormFloat64())
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(vals[i]))
	}
	half := n / 8 * 4
	u := &weights.Update{NumSamples: samples, Tensors: []weights.Tensor{
		{DType: weights.Float32, Shape: []int{half / 4, 4}, Data: data[:4*half]},
		{DType: weights.Float32, Shape: []int{n - half}, Data: data[4*half:]},
	}}
	var b bytes.Buffer
	if err := weights.Encode(&b, u); err != nil {
		tb.Fatal(err)
	}
	return b.Bytes(), vals
}

// TestKill9 kills the real server process with SIGKILL at random moments
// while leaves upload and rounds aggregate, restarts it on the same data,
// and checks: every upload that got its 201 is still there, byte for byte;
// every aggregation that was announced is still there; every round is
// aggregated exactly once, to the weighted mean of its inputs.
func TestKill9(t *testing.T) {
	addr := freeAddr(t)
	data := t.TempDir()
	args := []string{"--data", data, "--claim-lease", "1s", "--poll-interval", "100ms"}
	p := startProcess(t, addr, args...)
	a := MustAdmin(t, p.url())
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 3)
	leaves := make([]*wireLeaf, len(created))
	for i, c := range created {
		leaves[i] = &wireLeaf{server: p.url(), name: c.Name, password: c.Password, tree: tree, branch: branch}
	}
	login := func() {
		for _, l := range leaves {
			if err := l.login(); err != nil {
				t.Fatal(err)
			}
		}
	}
	login()
	const params = 1 << 21 // 8 MiB per update
	const rounds = 5
	announced := map[string]int{} // aggregation id -> round, seen before a kill
	for round := 1; round <= rounds; round++ {
		files := make([][]byte, len(leaves))
		vals := make([][]float32, len(leaves))
		samples := make([]int64, len(leaves))
		keys := make([]string, len(leaves))
		for i := range leaves {
			samples[i] = int64(100*(i+1) + round)
			files[i], vals[i] = float32Update(t, samples[i], params, uint64(round*10+i))
			b := make([]byte, 8)
			rand.Read(b)
			keys[i] = hex.EncodeToString(b)
		}
		acked := make([]string, len(leaves))
		var wg sync.WaitGroup
		for i, l := range leaves {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if id, _, err := l.upload(files[i], keys[i]); err == nil {
					acked[i] = id
				}
			}()
		}
		// Kill at a random moment: while uploading, while aggregating or
		// after.
		time.Sleep(time.Duration(mrand.IntN(250)) * time.Millisecond)
		if aggs, err := a.ListAggregations(context.Background(), tree, branch); err == nil {
			for _, ag := range aggs {
				announced[ag.ID] = ag.Round
			}
		}
		p.kill()
		wg.Wait()
		p = startProcess(t, addr, args...)
		login() // tokens survive restarts, but logging in again is what a leaf does
		for i, l := range leaves {
			if acked[i] != "" {
				got, status, err := l.download(acked[i])
				if err != nil || status != 200 || !bytes.Equal(got, files[i]) {
					t.Fatalf("round %d: acknowledged upload %s of leaf %d lost after kill -9: status %d, %v", round, acked[i], i, status, err)
				}
			}
			// A leaf retries what it did not see acknowledged, with the same
			// key: if the server had recorded it, it is not counted twice.
			id, status, err := l.upload(files[i], keys[i])
			if err != nil {
				t.Fatalf("round %d: retry of leaf %d: %d %v", round, i, status, err)
			}
			if acked[i] != "" && id != acked[i] {
				t.Fatalf("round %d: retry of an acknowledged upload made a second update %s (first %s)", round, id, acked[i])
			}
		}
		agg := waitAggregation(t, a, tree, branch, round)
		if len(agg.Inputs) != 3 {
			t.Fatalf("round %d aggregated %d inputs", round, len(agg.Inputs))
		}
		got, status, err := leaves[0].download(agg.ID)
		if err != nil || status != 200 {
			t.Fatalf("round %d: download aggregate: %d %v", round, status, err)
		}
		u, err := weights.Decode(bytes.NewReader(got))
		if err != nil {
			t.Fatal(err)
		}
		var total int64
		for _, n := range samples {
			total += n
		}
		if u.NumSamples != total {
			t.Fatalf("round %d: num_samples %d, want %d", round, u.NumSamples, total)
		}
		flat := append(append([]byte{}, u.Tensors[0].Data...), u.Tensors[1].Data...)
		for k := 0; k < params; k += 997 {
			var want float64
			for i := range leaves {
				want += float64(samples[i]) * float64(vals[i][k])
			}
			want /= float64(total)
			if g := math.Float32frombits(binary.LittleEndian.Uint32(flat[4*k:])); g != float32(want) {
				t.Fatalf("round %d: parameter %d is %v, want %v", round, k, g, float32(want))
			}
		}
	}
	aggs, err := a.ListAggregations(context.Background(), tree, branch)
	if err != nil {
		t.Fatal(err)
	}
	byRound := map[int]int{}
	ids := map[string]bool{}
	for _, ag := range aggs {
		byRound[ag.Round]++
		ids[ag.ID] = true
	}
	for round := 1; round <= rounds; round++ {
		if byRound[round] != 1 {
			t.Errorf("round %d aggregated %d times", round, byRound[round])
		}
	}
	for id, round := range announced {
		if !ids[id] {
			t.Errorf("announced aggregation %s of round %d lost", id, round)
		}
	}
	t.Logf("%d rounds, %d aggregations announced before kills survived", rounds, len(announced))
}

// waitAggregation waits until a round of run 1 is aggregated.
func waitAggregation(tb testing.TB, a *client.Admin, tree, branch string, round int) *aggregation {
	tb.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		aggs, err := a.ListAggregations(context.Background(), tree, branch)
		if err == nil {
			for _, ag := range aggs {
				if ag.Round == round && ag.Run == 1 {
					return &aggregation{ID: ag.ID, Inputs: ag.Inputs}
				}
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := a.ShowBranch(context.Background(), tree, branch)
	tb.Fatalf("round %d not aggregated in time; branch %+v", round, b)
	return nil
}

type aggregation struct {
	ID     string
	Inputs []string
}
