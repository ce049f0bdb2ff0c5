package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
)

const testAdminToken = "test-admin-token-0123456789"

// fixtures is the numpy-made test data.
var fixturesAbs, _ = filepath.Abs("../../testdata/fixtures")

var nameSeq atomic.Int64

// uniqueName returns a name unique in this test process and across
// processes sharing a broker or database.
func uniqueName(prefix string) string {
	return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), nameSeq.Add(1))
}

// MustServer starts the real server (the Main the binary runs) on
// 127.0.0.1:0 with a temporary data directory and the admin API on, and
// closes it at the end of the test. configure may change the configuration
// first.
func MustServer(tb testing.TB, configure func(*Config)) *Main {
	tb.Helper()
	m := NewMain()
	m.Config.Addr = "127.0.0.1:0"
	m.Config.Data = tb.TempDir()
	m.Config.AdminToken = testAdminToken
	m.Config.PollInterval = 100 * time.Millisecond
	m.Config.LogFormat = "text"
	m.Config.LogLevel = "warn"
	if configure != nil {
		configure(&m.Config)
	}
	if err := m.Run(context.Background()); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := m.Close(); err != nil {
			tb.Error(err)
		}
	})
	return m
}

// MustAdmin returns an admin client of a server.
func MustAdmin(tb testing.TB, url string) *client.Admin {
	tb.Helper()
	a, err := client.NewAdmin(url, testAdminToken, nil)
	if err != nil {
		tb.Fatal(err)
	}
	return a
}

// testLeaf is a created leaf and its password.
type testLeaf struct {
	Name     string `json:"name"`
	Password string `json:"password"`
	ID       string `json:"id"`
}

// MustBranch creates a tree (if tree is "", a new one), a branch with spec,
// and n leaves, and returns their names.
func MustBranch(tb testing.TB, a *client.Admin, tree string, spec client.BranchSpec, n int) (string, string, []testLeaf) {
	tb.Helper()
	ctx := context.Background()
	if tree == "" {
		tree = uniqueName("tree")
		if _, err := a.CreateTree(ctx, tree); err != nil {
			tb.Fatal(err)
		}
	}
	if spec.ID == "" {
		spec.ID = uniqueName("branch")
	}
	if _, err := a.CreateBranch(ctx, tree, spec); err != nil {
		tb.Fatal(err)
	}
	var leaves []testLeaf
	for range n {
		l, err := a.CreateLeaf(ctx, tree, spec.ID, uniqueName("leaf"), "")
		if err != nil {
			tb.Fatal(err)
		}
		leaves = append(leaves, testLeaf{Name: l.Name, Password: l.Password, ID: l.ID})
	}
	return tree, spec.ID, leaves
}

func intp(n int) *int { return &n }

func python(tb testing.TB) string {
	tb.Helper()
	py := os.Getenv("BRANCHKEY_TEST_PYTHON")
	if py == "" {
		tb.Skip("BRANCHKEY_TEST_PYTHON is unset (set it to /usr/bin/python3 with numpy, requests and pika)")
	}
	return py
}

// runPython runs a script of testdata with a scenario as its JSON argument
// file and fails the test unless it prints "ok" last.
func runPython(tb testing.TB, script, mode string, scenario any) string {
	tb.Helper()
	py := python(tb)
	b, err := json.Marshal(scenario)
	if err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(tb.TempDir(), "scenario.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	scriptPath, err := filepath.Abs(filepath.Join("testdata", script))
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, py, scriptPath, mode, path)
	cmd.Dir = tb.TempDir()
	out, err := cmd.CombinedOutput()
	lines := bytes.Split(bytes.TrimSpace(out), []byte("\n"))
	if err != nil || string(lines[len(lines)-1]) != "ok" {
		tb.Fatalf("%s %s: %v\n%s", script, mode, err, out)
	}
	return string(out)
}

// binary builds the branchkey binary once per test process.
var buildBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "branchkey-bin-")
	if err != nil {
		return "", err
	}
	path := filepath.Join(dir, "branchkey")
	out, err := exec.Command("go", "build", "-o", path, ".").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return path, nil
})

func mustBinary(tb testing.TB) string {
	tb.Helper()
	p, err := buildBinary()
	if err != nil {
		tb.Fatal(err)
	}
	return p
}
