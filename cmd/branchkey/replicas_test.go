package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/s3/s3test"
	"github.com/jackc/pgx/v5"
)

// mustDatabase creates a fresh PostgreSQL database for the test on the test
// server and drops it at the end; it skips only when the server is unset.
func mustDatabase(tb testing.TB) string {
	tb.Helper()
	base := os.Getenv("BRANCHKEY_TEST_POSTGRES_URL")
	if base == "" {
		tb.Skip("BRANCHKEY_TEST_POSTGRES_URL is unset")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	name := strings.ReplaceAll(uniqueName("bk"), "-", "_")
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		c, err := pgx.Connect(context.Background(), base)
		if err == nil {
			c.Exec(context.Background(), "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
			c.Close(context.Background())
		}
	})
	u, err := url.Parse(base)
	if err != nil {
		tb.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// replicaSet is several "branchkey serve" processes sharing one PostgreSQL
// database, one S3 blob store and the local RabbitMQ.
type replicaSet struct {
	procs []*process
	args  []string
	addrs []string
	db    string
}

func startReplicas(tb testing.TB, n int, extra ...string) *replicaSet {
	tb.Helper()
	amqpURL, adminURL := amqpURLs(tb)
	db := mustDatabase(tb)
	endpoint := s3test.Start(tb, "branchkey")
	tb.Setenv("AWS_ACCESS_KEY_ID", "test-access-key")
	tb.Setenv("AWS_SECRET_ACCESS_KEY", "test-secret-key")
	blobs := fmt.Sprintf("s3://branchkey/replicas?endpoint=%s&region=us-east-1&insecure=true", endpoint)
	rs := &replicaSet{db: db}
	rs.args = append([]string{"--database", db, "--blobs", blobs, "--amqp-url", amqpURL, "--rabbitmq-admin-url", adminURL,
		"--claim-lease", "1s", "--poll-interval", "100ms"}, extra...)
	for i := range n {
		addr := freeAddr(tb)
		rs.addrs = append(rs.addrs, addr)
		rs.procs = append(rs.procs, startProcess(tb, addr, append(rs.args, "--data", filepath.Join(tb.TempDir(), strconv.Itoa(i)))...))
	}
	tb.Cleanup(func() {
		a := MustAdmin(tb, rs.procs[0].url())
		trees, _ := a.ListTrees(context.Background())
		for _, t := range trees {
			_ = a.DeleteTree(context.Background(), t.ID)
		}
	})
	return rs
}

// url returns replica i's base URL.
func (rs *replicaSet) url(i int) string { return rs.procs[i%len(rs.procs)].url() }

// TestReplicas runs three replicas on PostgreSQL, S3 and RabbitMQ with the
// leaves spread over them. Over several rounds: each round is aggregated
// exactly once, every leaf is notified once per round over RabbitMQ and over
// SSE on whichever replica it asks, and the downloaded aggregates equal
// numpy's FedAvg of the round's inputs. A deadline-triggered branch fires
// once across the replicas.
func TestReplicas(t *testing.T) {
	py := python(t)
	amqpURL, _ := amqpURLs(t)
	rs := startReplicas(t, 3)
	a := MustAdmin(t, rs.url(0))
	ctx := context.Background()
	const nLeaves, rounds = 6, 3
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(nLeaves)}, nLeaves)
	leaves := make([]*amqpLeaf, nLeaves)
	for i, c := range created {
		// leaf i logs in, uploads and downloads on replica i % 3
		leaves[i] = &amqpLeaf{wireLeaf: wireLeaf{server: rs.url(i), name: c.Name, password: c.Password, tree: tree, branch: branch}}
		if err := leaves[i].login(); err != nil {
			t.Fatal(err)
		}
		leaves[i].consume(t, amqpURL)
	}
	dir := t.TempDir()
	for round := 1; round <= rounds; round++ {
		var files []string
		var wg sync.WaitGroup
		for i, l := range leaves {
			file, _ := float32Update(t, int64(10*i+round), 40_000, uint64(round*100+i))
			path := filepath.Join(dir, fmt.Sprintf("r%d-leaf%d.npy", round, i))
			if err := os.WriteFile(path, file, 0o600); err != nil {
				t.Fatal(err)
			}
			files = append(files, path)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, status, err := l.upload(file, uniqueName("key")); err != nil {
					t.Errorf("round %d leaf %d: %d %v", round, i, status, err)
				}
			}()
		}
		wg.Wait()
		agg := waitAggregation(t, a, tree, branch, round)
		// every leaf is told once, over RabbitMQ
		for i, l := range leaves {
			got := 0
			deadline := time.After(20 * time.Second)
		wait:
			for {
				select {
				case d := <-l.msgs:
					d.Ack(false)
					var msg struct {
						Type string         `json:"message_type"`
						Body map[string]any `json:"body"`
					}
					json.Unmarshal(d.Body, &msg)
					if msg.Type == "aggregation_status" {
						if int(msg.Body["round"].(float64)) != round || msg.Body["aggregation_id"] != agg.ID {
							t.Fatalf("leaf %d: notification %v in round %d", i, msg.Body, round)
						}
						got++
						break wait
					}
				case <-deadline:
					break wait
				}
			}
			if got != 1 {
				t.Fatalf("round %d: leaf %d notified %d times", round, i, got)
			}
		}
		// the aggregate, downloaded from another replica, is numpy's FedAvg
		body, status, err := leaves[(round+1)%nLeaves].download(agg.ID)
		if err != nil || status != 200 {
			t.Fatalf("download: %d %v", status, err)
		}
		out := filepath.Join(dir, fmt.Sprintf("agg%d.npy", round))
		os.WriteFile(out, body, 0o600)
		checkNumpyFedAvg(t, py, out, files)
	}
	// No duplicate notification is left in any queue.
	for i, l := range leaves {
		select {
		case d := <-l.msgs:
			if strings.Contains(string(d.Body), "aggregation_status") {
				t.Errorf("leaf %d got an extra notification: %s", i, d.Body)
			}
		case <-time.After(300 * time.Millisecond):
		}
	}
	aggs, err := a.ListAggregations(ctx, tree, branch)
	if err != nil || len(aggs) != rounds {
		t.Fatalf("%d aggregations for %d rounds: %v", len(aggs), rounds, err)
	}
	modes := map[string]int{}
	for _, ag := range aggs {
		modes[ag.Mode]++
	}
	t.Logf("aggregation modes across replicas: %v", modes)

	// SSE on each replica carries every message of the branch.
	for r := range rs.procs {
		l := &leaves[r].wireLeaf
		l2 := *l
		l2.server = rs.url(r + 1)
		msgs := readSSE(t, &l2, rounds)
		if len(msgs) != rounds {
			t.Fatalf("SSE on replica %d: %d messages, want %d", r+1, len(msgs), rounds)
		}
	}

	// A deadline-triggered round fires once, whichever replicas see it.
	_, dbranch, dcreated := MustBranch(t, a, tree, client.BranchSpec{MinUpdates: intp(10), MaxWait: "1s", MinQuorum: 2}, 3)
	for i, c := range dcreated {
		l := &wireLeaf{server: rs.url(i), name: c.Name, password: c.Password, tree: tree, branch: dbranch}
		if err := l.login(); err != nil {
			t.Fatal(err)
		}
		file, _ := float32Update(t, 5, 1000, uint64(i))
		mustUpload(t, l, file)
	}
	waitAggregation(t, a, tree, dbranch, 1)
	time.Sleep(1500 * time.Millisecond) // time for a second firing, if any
	if aggs, _ := a.ListAggregations(ctx, tree, dbranch); len(aggs) != 1 || len(aggs[0].Inputs) != 3 {
		t.Fatalf("deadline round: %d aggregations", len(aggs))
	}
}

// readSSE reads n messages of a leaf's stream.
func readSSE(tb testing.TB, l *wireLeaf, n int) []string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", l.server+"/v1/events", nil)
	req.SetBasicAuth(l.id, l.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	var out []string
	buf := make([]byte, 64<<10)
	var acc bytes.Buffer
	for len(out) < n {
		k, err := resp.Body.Read(buf)
		acc.Write(buf[:k])
		for {
			line, rest, ok := bytes.Cut(acc.Bytes(), []byte("\n"))
			if !ok {
				break
			}
			if bytes.HasPrefix(line, []byte("data: ")) {
				out = append(out, string(line[6:]))
			}
			acc = *bytes.NewBuffer(append([]byte{}, rest...))
		}
		if err != nil {
			break
		}
	}
	return out
}

// checkNumpyFedAvg compares an aggregate with numpy's weighted mean of the
// files, within float32 rounding.
func checkNumpyFedAvg(tb testing.TB, py, agg string, files []string) {
	tb.Helper()
	script := `
import sys, numpy as np
agg = np.load(sys.argv[1], allow_pickle=True)
ups = [np.load(f, allow_pickle=True) for f in sys.argv[2:]]
total = sum(int(u[0]) for u in ups)
assert agg[0] == total, (agg[0], total)
for k in range(len(ups[0][1])):
    want = (sum(int(u[0]) * u[1][k].astype(np.float64) for u in ups) / total).astype(np.float32)
    assert np.allclose(agg[1][k], want, rtol=2**-23, atol=0), (k, np.abs(agg[1][k] - want).max())
print("ok")
`
	out, err := exec.Command(py, append([]string{"-c", script, agg}, files...)...).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		tb.Fatalf("numpy FedAvg check: %v\n%s", err, out)
	}
}

// claimOwner returns who holds a round's claim, from the shared database.
func (rs *replicaSet) claimOwner(tb testing.TB, tree, branch string, round int) string {
	tb.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, rs.db)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	var owner string
	err = conn.QueryRow(ctx, "SELECT claim_owner FROM rounds WHERE tree_id=$1 AND branch_id=$2 AND run=1 AND round=$3 AND status='closed'",
		tree, branch, round).Scan(&owner)
	if err != nil {
		return ""
	}
	return owner
}

// TestReplicaKilledHoldingClaim kills, with SIGKILL, the replica that holds
// a round's claim while it aggregates; another replica takes the round over
// when the lease expires and the round is aggregated exactly once.
func TestReplicaKilledHoldingClaim(t *testing.T) {
	amqpURLs(t)
	rs := startReplicas(t, 3)
	a := MustAdmin(t, rs.url(0))
	// median runs blocked, reading every update from S3: slow enough to be
	// caught in the act.
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(5), Strategy: "median"}, 5)
	var wg sync.WaitGroup
	for i, c := range created {
		l := &wireLeaf{server: rs.url(i), name: c.Name, password: c.Password, tree: tree, branch: branch}
		if err := l.login(); err != nil {
			t.Fatal(err)
		}
		file, _ := float32Update(t, int64(i+1), 6_000_000, uint64(i))
		wg.Add(1)
		go func() { defer wg.Done(); mustUpload(t, l, file) }()
	}
	wg.Wait()
	var owner string
	deadline := time.Now().Add(30 * time.Second)
	for owner == "" && time.Now().Before(deadline) {
		owner = rs.claimOwner(t, tree, branch, 1)
		time.Sleep(5 * time.Millisecond)
	}
	if owner == "" {
		t.Fatal("never saw the round claimed (did it finish first?)")
	}
	var victim *process
	for _, p := range rs.procs {
		if strings.Contains(owner, fmt.Sprintf("-%d-", p.cmd.Process.Pid)) {
			victim = p
		}
	}
	if victim == nil {
		t.Fatalf("claim owner %q is none of the replicas", owner)
	}
	victim.kill()
	agg := waitAggregation(t, a, tree, branch, 1)
	aggs, _ := a.ListAggregations(context.Background(), tree, branch)
	if len(aggs) != 1 || len(agg.Inputs) != 5 {
		t.Fatalf("%d aggregations of round 1 after the claimer died", len(aggs))
	}
	if now := rs.claimOwner(t, tree, branch, 1); now == owner {
		t.Fatalf("round still claimed by the dead replica")
	}
	t.Logf("replica %s died holding the claim; round aggregated once by another", owner)
}

// TestDisruptivePostgresRestart restarts PostgreSQL while leaves upload to
// two replicas: every upload that got its 201 survives, the service comes
// back by itself, and rounds go on.
func TestDisruptivePostgresRestart(t *testing.T) {
	if os.Getenv("BRANCHKEY_TEST_DISRUPTIVE") != "1" {
		t.Skip("restarts PostgreSQL; runs with BRANCHKEY_TEST_DISRUPTIVE=1")
	}
	rs := startReplicas(t, 2)
	a := MustAdmin(t, rs.url(0))
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(1000)}, 4)
	leaves := loginSpread(t, rs, tree, branch, created)
	cluster := func(action string) {
		out, err := exec.Command("bash", "-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main "+action).CombinedOutput()
		if err != nil {
			t.Fatalf("pg_ctlcluster %s: %v\n%s", action, err, out)
		}
	}
	t.Cleanup(func() {
		exec.Command("bash", "-c", "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main start").Run()
	})
	type acked struct {
		leaf int
		id   string
		data []byte
	}
	var mu sync.Mutex
	var ok []acked
	failed := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, l := range leaves {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				file, _ := float32Update(t, int64(k+1), 2000, uint64(i*1000+k))
				id, _, err := l.upload(file, uniqueName("key"))
				mu.Lock()
				if err == nil {
					ok = append(ok, acked{i, id, file})
				} else {
					failed++
				}
				mu.Unlock()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	cluster("restart")
	time.Sleep(1500 * time.Millisecond)
	close(stop)
	wg.Wait()
	// Each leaf's last acknowledged upload is its update in the open round
	// and must download as sent; its earlier ones were replaced (and their
	// files deleted), or still download as sent.
	last := map[int]string{}
	for _, u := range ok {
		last[u.leaf] = u.id
	}
	for _, u := range ok {
		var body []byte
		var status int
		for try := 0; try < 50; try++ {
			if body, status, _ = leaves[u.leaf].download(u.id); status == 200 || status == 404 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if status == 404 && last[u.leaf] != u.id {
			continue // replaced by a later upload of the same leaf in the round
		}
		if status != 200 || !bytes.Equal(body, u.data) {
			t.Fatalf("acknowledged upload %s lost after the database restart: %d", u.id, status)
		}
	}
	b, err := a.ShowBranch(context.Background(), tree, branch)
	if err != nil || b.CurrentRound.Count != len(leaves) {
		t.Fatalf("after the restart the round holds %v updates (want one per leaf): %v", b.CurrentRound, err)
	}
	t.Logf("%d uploads acknowledged, %d refused during the restart; none lost", len(ok), failed)
}

// loginSpread logs leaves in, leaf i on replica i.
func loginSpread(tb testing.TB, rs *replicaSet, tree, branch string, created []testLeaf) []*wireLeaf {
	tb.Helper()
	ls := make([]*wireLeaf, len(created))
	for i, c := range created {
		ls[i] = &wireLeaf{server: rs.url(i), name: c.Name, password: c.Password, tree: tree, branch: branch}
		var err error
		for try := 0; try < 3; try++ {
			if err = ls[i].login(); err == nil {
				break
			}
		}
		if err != nil {
			tb.Fatal(err)
		}
	}
	return ls
}
