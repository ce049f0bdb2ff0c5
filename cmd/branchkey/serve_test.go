package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/spf13/pflag"
)

// TestWireHappyPath runs a Python script that speaks the wire contract as
// the published client does: three leaves log in and upload round_0, read
// the aggregation notification over SSE, download the aggregate and find it
// equal to numpy's FedAvg, then log out.
func TestWireHappyPath(t *testing.T) {
	python(t)
	m := MustServer(t, nil)
	a := MustAdmin(t, m.URL())
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 3)
	runPython(t, "wire_leaf.py", "happy", map[string]any{
		"server": m.URL(), "admin_token": testAdminToken, "tree": tree, "branch": branch,
		"leaves": leaves, "fixtures": fixturesAbs,
	})
	aggs, err := a.ListAggregations(context.Background(), tree, branch)
	if err != nil {
		t.Fatal(err)
	}
	if len(aggs) != 2 || aggs[0].Round != 1 || aggs[1].Round != 2 {
		t.Fatalf("aggregations %+v, want rounds 1 and 2", aggs)
	}
	if aggs[0].Mode != "incremental" {
		t.Errorf("round 1 aggregated %s, want incremental on one node", aggs[0].Mode)
	}
}

// TestWireErrors checks every error status of the leaf API through the
// same Python script, hostile files included, and that the server keeps
// serving.
func TestWireErrors(t *testing.T) {
	python(t)
	m := MustServer(t, func(c *Config) { c.MaxUpload = "1MiB" })
	a := MustAdmin(t, m.URL())
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 2)
	_, other, others := MustBranch(t, a, tree, client.BranchSpec{}, 1)
	runPython(t, "wire_leaf.py", "errors", map[string]any{
		"server": m.URL(), "admin_token": testAdminToken, "tree": tree, "branch": branch,
		"leaves": leaves, "fixtures": fixturesAbs, "other_branch": other, "other_leaf": others[0],
	})
}

func TestHealth(t *testing.T) {
	m := MustServer(t, nil)
	for _, path := range []string{"/", "/healthz", "/readyz"} {
		resp, err := http.Get(m.URL() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("GET %s: %d", path, resp.StatusCode)
		}
	}
	resp, err := http.Get(m.URL() + "/v1/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Errorf("unknown route: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
}

// TestAdminErrors checks the admin API's answers through its client.
func TestAdminErrors(t *testing.T) {
	m := MustServer(t, nil)
	ctx := context.Background()
	a := MustAdmin(t, m.URL())
	code := func(err error) string {
		var ce *client.Error
		if !errors.As(err, &ce) {
			t.Fatalf("error %v is not a *client.Error", err)
		}
		return ce.Code
	}
	if _, err := a.CreateTree(ctx, "bad tree"); code(err) != branchkey.EINVALID {
		t.Errorf("bad tree id: %v", err)
	}
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{}, 1)
	if _, err := a.CreateTree(ctx, tree); code(err) != branchkey.ECONFLICT {
		t.Errorf("tree twice: %v", err)
	}
	if _, err := a.CreateBranch(ctx, tree, client.BranchSpec{ID: "b", Strategy: "nope"}); code(err) != branchkey.EINVALID {
		t.Errorf("bad strategy: %v", err)
	}
	if _, err := a.CreateBranch(ctx, tree, client.BranchSpec{ID: "b", Strategy: "trimmed-mean", StrategyOptions: map[string]string{"trim": "0.7"}}); code(err) != branchkey.EINVALID || !strings.Contains(err.Error(), "trim") {
		t.Errorf("bad trim: %v", err)
	}
	if _, err := a.CreateLeaf(ctx, tree, branch, leaves[0].Name, ""); code(err) != branchkey.ECONFLICT {
		t.Errorf("leaf name twice: %v", err)
	}
	if _, err := a.CreateLeaf(ctx, tree, "no-branch", "x", ""); code(err) != branchkey.ENOTFOUND {
		t.Errorf("leaf in a missing branch: %v", err)
	}
	if _, err := a.ShowBranch(ctx, tree, "missing"); code(err) != branchkey.ENOTFOUND {
		t.Errorf("missing branch: %v", err)
	}
	bad, _ := client.NewAdmin(m.URL(), "wrong-token-wrong-token", nil)
	if _, err := bad.ListTrees(ctx); code(err) != branchkey.EUNAUTHORIZED {
		t.Errorf("wrong admin token: %v", err)
	}
	// reset-password revokes: the old password no longer logs in
	nl, err := a.ResetPassword(ctx, tree, branch, leaves[0].Name, "")
	if err != nil || nl.Password == leaves[0].Password || len(nl.Password) < 20 {
		t.Fatalf("reset: %v %+v", err, nl)
	}
	if err := a.DeleteLeaf(ctx, tree, branch, leaves[0].Name); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteTree(ctx, tree); err != nil {
		t.Fatal(err)
	}
	if ts, err := a.ListTrees(ctx); err != nil || len(ts) != 0 {
		t.Fatalf("trees after delete: %v %v", ts, err)
	}
}

// TestAdminCLI drives the admin commands as operators script them.
func TestAdminCLI(t *testing.T) {
	m := MustServer(t, nil)
	t.Setenv("BRANCHKEY_SERVER", m.URL())
	t.Setenv("BRANCHKEY_ADMIN_TOKEN", testAdminToken)
	ctx := context.Background()
	for _, args := range [][]string{
		{"admin", "tree", "create", "t1"},
		{"admin", "tree", "list"},
		{"admin", "branch", "create", "t1", "b1", "--min-updates", "4", "--sample-size", "3", "--max-wait", "10m", "--min-quorum", "2", "--strategy", "trimmed-mean", "-o", "trim=0.2"},
		{"admin", "branch", "create", "t1", "b2", "--paused"},
		{"admin", "branch", "list", "t1"},
		{"admin", "branch", "show", "t1", "b1"},
		{"admin", "leaf", "create", "t1", "b1", "alice"},
		{"admin", "leaf", "list", "t1", "b1"},
		{"admin", "leaf", "reset-password", "t1", "b1", "alice"},
		{"admin", "run", "pause", "t1", "b1"},
		{"admin", "run", "stop", "t1", "b1"},
		{"admin", "run", "start", "t1", "b1"},
		{"admin", "leaf", "delete", "t1", "b1", "alice"},
		{"admin", "branch", "delete", "t1", "b2"},
	} {
		if code := run(ctx, args); code != 0 {
			t.Fatalf("%v: exit %d", args, code)
		}
	}
	b, err := MustAdmin(t, m.URL()).ShowBranch(ctx, "t1", "b1")
	if err != nil {
		t.Fatal(err)
	}
	p := b.Policy
	if p.MinUpdates != 4 || p.SampleSize != 3 || b.MaxWait != "10m0s" || p.MinQuorum != 2 || p.Strategy != "trimmed-mean" || p.StrategyOptions["trim"] != "0.2" || b.RunNumber != 2 {
		t.Fatalf("branch %+v", b)
	}
	// the password from stdin
	r, w, _ := os.Pipe()
	w.WriteString("a-password-from-stdin\n")
	w.Close()
	old := os.Stdin
	os.Stdin = r
	defer func() { os.Stdin = old }()
	if code := run(ctx, []string{"admin", "leaf", "create", "t1", "b1", "bob", "--password-stdin"}); code != 0 {
		t.Fatalf("create with --password-stdin: exit %d", code)
	}
	if code := run(ctx, []string{"admin", "tree", "create", "bad tree"}); code == 0 {
		t.Fatal("a bad tree id exited 0")
	}
}

// TestServeConfig checks flag, environment and config file precedence.
func TestServeConfig(t *testing.T) {
	cfgPath := filepath.Join(t.TempDir(), "branchkey.toml")
	os.WriteFile(cfgPath, []byte("addr = \"127.0.0.1:9999\"\nmax-upload = \"2GiB\"\ntoken-ttl = \"1h\"\nlog-level = \"debug\"\n"), 0o600)
	t.Setenv("BRANCHKEY_MAX_UPLOAD", "3GiB")
	c := DefaultConfig()
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	c.bindFlags(fs)
	if err := fs.Parse([]string{"--log-level", "warn"}); err != nil {
		t.Fatal(err)
	}
	if err := applyEnvAndFile(fs, cfgPath); err != nil {
		t.Fatal(err)
	}
	if c.Addr != "127.0.0.1:9999" || c.MaxUpload != "3GiB" || c.TokenTTL.String() != "1h0m0s" || c.LogLevel != "warn" {
		t.Fatalf("config %+v", c)
	}
	os.WriteFile(cfgPath, []byte("adress = \"x\"\n"), 0o600)
	if err := applyEnvAndFile(fs, cfgPath); err == nil || !strings.Contains(err.Error(), "unknown setting \"adress\"") {
		t.Fatalf("typo in config: %v", err)
	}
}

// TestServePortTaken: a taken port fails at start, not later.
func TestServePortTaken(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	m := NewMain()
	m.Config.Addr = ln.Addr().String()
	m.Config.Data = t.TempDir()
	m.Config.LogLevel = "error"
	if err := m.Run(context.Background()); err == nil || !strings.Contains(err.Error(), "listen") {
		m.Close()
		t.Fatalf("Run on a taken port: %v", err)
	}
}
