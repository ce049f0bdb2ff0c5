package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/weights"
)

// leafCLI runs "branchkey leaf ARGS..." in this process and returns what
// it printed.
func leafCLI(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	cmd := newRootCmd()
	var out, errb syncBuffer
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	cmd.SetArgs(append([]string{"leaf"}, args...))
	err = cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// syncBuffer is a bytes.Buffer safe to read while a command writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// mustLeafCLI runs a leaf command and fails the test if it fails.
func mustLeafCLI(tb testing.TB, ctx context.Context, args ...string) string {
	tb.Helper()
	out, errOut, err := leafCLI(ctx, args...)
	if err != nil {
		tb.Fatalf("branchkey leaf %s: %v\n%s", strings.Join(args, " "), err, errOut)
	}
	return out
}

// mustCredentials writes a leaf's credentials file in the Python client's
// format (the port as a string, as such files often have it) and returns
// its path. host "" means notifications over SSE.
func mustCredentials(tb testing.TB, tree, branch string, l testLeaf, host string, port int) string {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), l.Name+".json")
	creds := map[string]string{
		"leaf_name": l.Name, "leaf_password": l.Password, "tree_id": tree, "branch_id": branch, "queue_password": "unused",
	}
	if host != "" {
		creds["host"], creds["port"] = host, fmt.Sprint(port)
	}
	b, _ := json.Marshal(creds)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
	return path
}

// checkFedAvg is the training script's stand-in for watch --exec: it
// computes numpy's FedAvg of the fixture updates, compares the aggregate
// it is given (its last argument) with it, and writes "ok" to a marker.
const checkFedAvg = `
import glob, os, sys
from functools import reduce
import numpy as np

fixtures, marker, path = sys.argv[1], sys.argv[2], sys.argv[-1]
assert os.environ["BRANCHKEY_AGGREGATE"] == path, "BRANCHKEY_AGGREGATE"
leaves = [np.load(p, allow_pickle=True) for p in sorted(glob.glob(os.path.join(fixtures, "leaf*.npy")))]
total = sum(int(a[0]) for a in leaves)
want = [reduce(np.add, layers) / total for layers in zip(*[[l * int(a[0]) for l in a[1]] for a in leaves])]
got = np.load(path, allow_pickle=True)
assert int(got[0]) == total, "num_samples %d, numpy %d" % (int(got[0]), total)
assert int(os.environ["BRANCHKEY_NUM_SAMPLES"]) == total
assert len(got[1]) == len(want)
for g, w, l in zip(got[1], want, leaves[0][1]):
    assert g.dtype == l.dtype and g.shape == w.shape, (g.dtype, g.shape, w.shape)
    assert np.allclose(g, w.astype(l.dtype), rtol=1e-6, atol=1e-7), np.abs(g - w).max()
with open(marker, "w") as f:
    f.write("ok")
`

// assertNearFedAvg compares a downloaded aggregate with the fixtures'
// fedavg.npy (numpy's) within float32 rounding.
func assertNearFedAvg(tb testing.TB, path string) {
	tb.Helper()
	got, err := weights.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	want, err := weights.ReadFile(filepath.Join(fixturesAbs, "round_0", "fedavg.npy"))
	if err != nil {
		tb.Fatal(err)
	}
	if got.NumSamples != want.NumSamples || got.Signature() != want.Signature() {
		tb.Fatalf("aggregate %d %s, numpy %d %s", got.NumSamples, got.Signature(), want.NumSamples, want.Signature())
	}
	for i := range got.Tensors {
		g, w := make([]float64, got.Tensors[i].Len()), make([]float64, want.Tensors[i].Len())
		got.Tensors[i].DType.ToFloat64(g, got.Tensors[i].Data)
		want.Tensors[i].DType.ToFloat64(w, want.Tensors[i].Data)
		for j := range g {
			if math.Abs(g[j]-w[j]) > 1e-6*math.Max(1, math.Abs(w[j])) {
				tb.Fatalf("tensor %d element %d: %v, numpy %v", i, j, g[j], w[j])
			}
		}
	}
}

// watchLine is one line of "watch --json".
type watchLine struct {
	Type          string `json:"type"`
	AggregationID string `json:"aggregation_id"`
	Path          string `json:"path"`
	Round         int    `json:"round"`
	NumSamples    int64  `json:"num_samples"`
	RunStatus     string `json:"run_status"`
}

func parseWatch(tb testing.TB, out string) []watchLine {
	tb.Helper()
	var lines []watchLine
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var l watchLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			tb.Fatalf("watch printed %q: %v", sc.Text(), err)
		}
		lines = append(lines, l)
	}
	return lines
}

var uuidRE = regexp.MustCompile(`^[0-9a-f-]{36}$`)

// TestLeafCLI_UploadWatch is a round from the command line, over SSE and
// over AMQP: three leaves upload with "leaf upload", the third then waits
// with "leaf watch --count 1 --exec", whose command (numpy, as a training
// script would) finds the downloaded aggregate equal to numpy's FedAvg.
func TestLeafCLI_UploadWatch(t *testing.T) {
	for _, tc := range []struct {
		name string
		amqp bool
	}{{"SSE", false}, {"AMQP", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var m *Main
			host, port := "", 0
			if tc.amqp {
				m = MustRabbitServer(t, nil)
				host, port = brokerHost(t)
			} else {
				m = MustServer(t, nil)
			}
			a := MustAdmin(t, m.URL())
			tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 3)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			state := t.TempDir()
			common := []string{"--server", m.URL(), "--state-dir", state}

			for i, l := range leaves {
				creds := mustCredentials(t, tree, branch, l, host, port)
				out := mustLeafCLI(t, ctx, append(common, "--credentials", creds, "upload", filepath.Join(fixturesAbs, "round_0", fmt.Sprintf("leaf%d.npy", i)))...)
				if !uuidRE.MatchString(strings.TrimSpace(out)) {
					t.Fatalf("upload printed %q, want the file id", out)
				}
				if i < 2 {
					continue
				}
				dir := t.TempDir()
				args := append(common, "--credentials", creds, "watch", "--count", "1", "--json", "--dir", dir)
				marker := filepath.Join(t.TempDir(), "checked")
				if py := os.Getenv("BRANCHKEY_TEST_PYTHON"); py != "" {
					script := filepath.Join(t.TempDir(), "check_fedavg.py")
					if err := os.WriteFile(script, []byte(checkFedAvg), 0o600); err != nil {
						t.Fatal(err)
					}
					args = append(args, "--exec", fmt.Sprintf("'%s' '%s' '%s' '%s'", py, script, filepath.Join(fixturesAbs, "round_0"), marker))
				}
				out, errOut, err := leafCLI(ctx, args...)
				if err != nil {
					t.Fatalf("watch: %v\n%s", err, errOut)
				}
				lines := parseWatch(t, out)
				if len(lines) != 1 || lines[0].Type != branchkey.MessageAggregationStatus || lines[0].Round != 1 || lines[0].NumSamples != 3663 ||
					lines[0].Path != filepath.Join(dir, lines[0].AggregationID) {
					t.Fatalf("watch printed %+v", lines)
				}
				assertNearFedAvg(t, lines[0].Path)
				if os.Getenv("BRANCHKEY_TEST_PYTHON") != "" {
					if b, err := os.ReadFile(marker); err != nil || string(b) != "ok" {
						t.Fatalf("the --exec check did not pass: %v\n%s", err, errOut)
					}
				}
			}
		})
	}
}

// TestLeafCLI_Session checks the saved session: login writes it (0600),
// later commands reuse it, a revoked one is replaced by a new login,
// logout deletes it; and the text and JSON outputs of each command.
func TestLeafCLI_Session(t *testing.T) {
	m := MustServer(t, nil)
	a := MustAdmin(t, m.URL())
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(2)}, 1)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	state := t.TempDir()
	creds := mustCredentials(t, tree, branch, leaves[0], "", 0)
	common := []string{"--server", m.URL(), "--state-dir", state, "--credentials", creds}
	session := func() (string, os.FileMode) {
		t.Helper()
		files, _ := filepath.Glob(filepath.Join(state, "sessions", "*.json"))
		if len(files) != 1 {
			return "", 0
		}
		b, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(files[0])
		var s struct {
			Token string `json:"access_token"`
		}
		json.Unmarshal(b, &s)
		return s.Token, fi.Mode().Perm()
	}

	var login struct {
		Status    string `json:"status"`
		LeafID    string `json:"leaf_id"`
		RunStatus string `json:"run_status"`
	}
	if err := json.Unmarshal([]byte(mustLeafCLI(t, ctx, append(common, "--json", "login")...)), &login); err != nil ||
		login.Status != "logged_in" || login.LeafID != leaves[0].ID || login.RunStatus != "start" {
		t.Fatalf("login printed %+v, %v", login, err)
	}
	token, mode := session()
	if token == "" || mode != 0o600 {
		t.Fatalf("session token %q, mode %v", token, mode)
	}
	if fi, err := os.Stat(filepath.Join(state, "sessions")); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("sessions dir %v, %v", fi, err)
	}

	id := strings.TrimSpace(mustLeafCLI(t, ctx, append(common, "upload", "--metadata", "epoch 1", filepath.Join(fixturesAbs, "round_0", "leaf0.npy"))...))
	if tok, _ := session(); tok != token {
		t.Errorf("upload replaced a valid session")
	}

	// Another process logs the leaf out: the saved token is revoked.
	other, err := client.New(client.Credentials{LeafName: leaves[0].Name, LeafPassword: leaves[0].Password, TreeID: tree, BranchID: branch}, client.WithServer(m.URL()))
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Logout(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var dl struct {
		FileID string `json:"file_id"`
		Path   string `json:"path"`
		Bytes  int64  `json:"bytes"`
	}
	if err := json.Unmarshal([]byte(mustLeafCLI(t, ctx, append(common, "--json", "download", "--dir", dir, id)...)), &dl); err != nil ||
		dl.FileID != id || dl.Path != filepath.Join(dir, id) || dl.Bytes != 635 {
		t.Fatalf("download printed %+v, %v", dl, err)
	}
	if tok, _ := session(); tok == token || tok == "" {
		t.Errorf("the revoked session was not replaced")
	}
	if out := mustLeafCLI(t, ctx, append(common, "download", "--dir", dir, id)...); strings.TrimSpace(out) != filepath.Join(dir, id) {
		t.Errorf("download printed %q", out)
	}

	if out := mustLeafCLI(t, ctx, append(common, "logout")...); !strings.Contains(out, "logged out") {
		t.Errorf("logout printed %q", out)
	}
	if tok, _ := session(); tok != "" {
		t.Errorf("logout kept the session")
	}

	t.Run("ErrPassword", func(t *testing.T) {
		l := leaves[0]
		l.Password = "wrong"
		_, _, err := leafCLI(ctx, "--server", m.URL(), "--state-dir", t.TempDir(), "--credentials", mustCredentials(t, tree, branch, l, "", 0), "login")
		if branchkey.ErrorCode(err) != branchkey.EUNAUTHORIZED || !strings.Contains(err.Error(), "invalid leaf name or password") {
			t.Fatalf("login = %v", err)
		}
	})
	t.Run("ErrNoCredentials", func(t *testing.T) {
		for _, k := range []string{"BRANCHKEY_CREDENTIALS", "BRANCHKEY_LEAF_NAME", "BRANCHKEY_LEAF_PASSWORD", "BRANCHKEY_TREE_ID", "BRANCHKEY_BRANCH_ID"} {
			t.Setenv(k, "")
		}
		_, _, err := leafCLI(ctx, "--server", m.URL(), "--state-dir", t.TempDir(), "upload", "x.npy")
		if err == nil || !strings.Contains(err.Error(), "--credentials") {
			t.Fatalf("upload = %v", err)
		}
	})
	t.Run("ErrInvalidFile", func(t *testing.T) {
		_, _, err := leafCLI(ctx, append(common, "upload", filepath.Join(fixturesAbs, "bad_nan.npy"))...)
		if branchkey.ErrorCode(err) != branchkey.EINVALID {
			t.Fatalf("upload = %v", err)
		}
	})
	t.Run("Progress", func(t *testing.T) {
		_, errOut, err := leafCLI(ctx, append(common, "--progress", "always", "download", "--dir", dir, id)...)
		if err != nil || !strings.Contains(errOut, "download "+id) {
			t.Fatalf("download = %v; stderr %q", err, errOut)
		}
	})
}

// TestLeafCLI_WatchServerRestart kills the server (SIGKILL) while "leaf
// watch" waits and starts it again on the same data and port: the watch
// reconnects and the round's aggregate still arrives.
func TestLeafCLI_WatchServerRestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		amqp bool
	}{{"SSE", false}, {"AMQP", true}} {
		t.Run(tc.name, func(t *testing.T) {
			var serveArgs []string
			host, port := "", 0
			if tc.amqp {
				amqpURL, adminURL := amqpURLs(t)
				serveArgs = []string{"--amqp-url", amqpURL, "--rabbitmq-admin-url", adminURL}
				host, port = brokerHost(t)
			}
			addr, data := freeAddr(t), t.TempDir()
			serveArgs = append(serveArgs, "--data", data, "--poll-interval", "100ms")
			p := startProcess(t, addr, serveArgs...)
			a := MustAdmin(t, p.url())
			tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 3)
			ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
			defer cancel()
			state, dir := t.TempDir(), t.TempDir()
			var creds []string
			for _, l := range leaves {
				creds = append(creds, mustCredentials(t, tree, branch, l, host, port))
			}
			common := []string{"--server", p.url(), "--state-dir", state}
			mustLeafCLI(t, ctx, append(common, "--credentials", creds[0], "upload", filepath.Join(fixturesAbs, "round_0", "leaf0.npy"))...)

			type result struct {
				out, errOut string
				err         error
			}
			done := make(chan result, 1)
			go func() {
				out, errOut, err := leafCLI(ctx, append(common, "--credentials", creds[2], "watch", "--count", "1", "--json", "--dir", dir)...)
				done <- result{out, errOut, err}
			}()
			// Wait until watch has logged in (it saves its session), and
			// give its consumer a moment to connect.
			waitFor(t, 20*time.Second, func() bool {
				files, _ := filepath.Glob(filepath.Join(state, "sessions", "*.json"))
				return len(files) == 2
			})
			time.Sleep(500 * time.Millisecond)

			p.kill()
			time.Sleep(time.Second)
			startProcess(t, addr, serveArgs...)
			// Registered after the new process, so it runs before its kill:
			// deleting the tree cleans the broker side.
			t.Cleanup(func() { _ = a.DeleteTree(context.Background(), tree) })

			for i := 1; i < 3; i++ {
				mustLeafCLI(t, ctx, append(common, "--credentials", creds[i], "upload", filepath.Join(fixturesAbs, "round_0", fmt.Sprintf("leaf%d.npy", i)))...)
			}
			var r result
			select {
			case r = <-done:
			case <-ctx.Done():
				t.Fatal("watch did not end")
			}
			if r.err != nil {
				t.Fatalf("watch: %v\n%s", r.err, r.errOut)
			}
			lines := parseWatch(t, r.out)
			if len(lines) != 1 || lines[0].Round != 1 {
				t.Fatalf("watch printed %+v\n%s", lines, r.errOut)
			}
			assertNearFedAvg(t, lines[0].Path)
			if !tc.amqp && !strings.Contains(r.errOut, "reconnecting") {
				t.Errorf("watch did not report the lost server:\n%s", r.errOut)
			}
		})
	}
}

// waitFor polls cond every 20ms until it holds or timeout passes.
func waitFor(tb testing.TB, timeout time.Duration, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatal("timed out")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
