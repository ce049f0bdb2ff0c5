package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
)

// TestPythonTrainingExample runs examples/python/train_leaf.py, the PyTorch
// training example for the published client, as two leaves against a server
// notifying through RabbitMQ. The published client is not installable here
// (no PyPI), so the example runs with the stand-in package beside it, which
// makes the published client's calls; see its package doc.
func TestPythonTrainingExample(t *testing.T) {
	py := python(t)
	if out, err := exec.Command(py, "-c", "import torch, pika, requests").CombinedOutput(); err != nil {
		t.Fatalf("the example needs Debian's python3-torch, python3-pika and python3-requests: %v\n%s", err, out)
	}
	m := MustRabbitServer(t, nil)
	a := MustAdmin(t, m.URL())
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(2)}, 2)
	host, port := brokerHost(t)
	example, _ := filepath.Abs("../../examples/python/train_leaf.py")
	standin, _ := filepath.Abs("../../examples/python/standin")
	const rounds = 3
	type line struct {
		Round          int     `json:"round"`
		Aggregate      string  `json:"aggregate"`
		GlobalAccuracy float64 `json:"global_accuracy"`
		LocalAccuracy  float64 `json:"local_accuracy"`
	}
	results := make([][]line, len(leaves))
	var wg sync.WaitGroup
	for i, l := range leaves {
		dir := t.TempDir()
		creds, _ := json.Marshal(map[string]any{"leaf_name": l.Name, "leaf_password": l.Password, "tree_id": tree,
			"branch_id": branch, "queue_password": "", "host": host, "port": port})
		credPath := filepath.Join(dir, "leaf.json")
		if err := os.WriteFile(credPath, creds, 0o600); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, py, example, "--credentials", credPath, "--server", m.URL(),
				"--leaf-index", string(rune('0'+i)), "--leaves", "2", "--rounds", "3")
			cmd.Dir = dir
			cmd.Env = append(os.Environ(), "PYTHONPATH="+standin)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Errorf("leaf %d: %v\n%s\n%s", i, err, out, stderr.String())
				return
			}
			sc := bufio.NewScanner(bytes.NewReader(out))
			for sc.Scan() {
				var ln line
				if json.Unmarshal(sc.Bytes(), &ln) == nil && ln.Round > 0 {
					results[i] = append(results[i], ln)
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for r := range rounds {
		a, b := results[0][r], results[1][r]
		if a.Aggregate != b.Aggregate {
			t.Errorf("round %d: the leaves loaded different aggregates %s and %s", r+1, a.Aggregate, b.Aggregate)
		}
		if a.GlobalAccuracy != b.GlobalAccuracy {
			t.Errorf("round %d: the leaves hold different global models (%v, %v)", r+1, a.GlobalAccuracy, b.GlobalAccuracy)
		}
	}
	last := results[0][rounds-1]
	if last.GlobalAccuracy < 0.85 {
		t.Errorf("final global accuracy %.3f, want >= 0.85", last.GlobalAccuracy)
	}
	t.Logf("global accuracy by round: %.3f %.3f %.3f (local models before averaging: leaf 0 %.3f, leaf 1 %.3f)",
		results[0][0].GlobalAccuracy, results[0][1].GlobalAccuracy, last.GlobalAccuracy, results[0][0].LocalAccuracy, results[1][0].LocalAccuracy)
}
