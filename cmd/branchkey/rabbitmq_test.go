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
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/branchkey/branchkey/client"
	amqp "github.com/rabbitmq/amqp091-go"
)

// amqpURLs returns the test broker, skipping only when it is unset.
func amqpURLs(tb testing.TB) (amqpURL, adminURL string) {
	tb.Helper()
	amqpURL = os.Getenv("BRANCHKEY_TEST_AMQP_URL")
	adminURL = os.Getenv("BRANCHKEY_TEST_RABBITMQ_ADMIN_URL")
	if amqpURL == "" || adminURL == "" {
		tb.Skip("BRANCHKEY_TEST_AMQP_URL or BRANCHKEY_TEST_RABBITMQ_ADMIN_URL is unset")
	}
	return amqpURL, adminURL
}

// MustRabbitServer starts the server with notifications through the test
// broker, and deletes the test's trees from the broker at the end.
func MustRabbitServer(tb testing.TB, configure func(*Config)) *Main {
	tb.Helper()
	amqpURL, adminURL := amqpURLs(tb)
	m := MustServer(tb, func(c *Config) {
		c.AMQPURL, c.RabbitMQAdminURL = amqpURL, adminURL
		if configure != nil {
			configure(c)
		}
	})
	tb.Cleanup(func() {
		a := MustAdmin(tb, m.URL())
		trees, _ := a.ListTrees(context.Background())
		for _, t := range trees {
			_ = a.DeleteTree(context.Background(), t.ID)
		}
	})
	return m
}

func brokerHost(tb testing.TB) (string, int) {
	amqpURL, _ := amqpURLs(tb)
	u, err := url.Parse(amqpURL)
	if err != nil {
		tb.Fatal(err)
	}
	port := 5672
	if p := u.Port(); p != "" {
		fmt.Sscan(p, &port)
	}
	return u.Hostname(), port
}

// TestRabbitMQWire runs the published client's flow with notifications over
// RabbitMQ: login provisions the broker before the 201, the pika consumer
// receives aggregation_status and run_status, the aggregate downloads and
// equals numpy's FedAvg; a leaf's credentials reach nothing but its queue;
// logout closes its connection and its old token no longer connects.
func TestRabbitMQWire(t *testing.T) {
	python(t)
	m := MustRabbitServer(t, nil)
	a := MustAdmin(t, m.URL())
	tree, branch, leaves := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(3)}, 3)
	host, port := brokerHost(t)
	runPython(t, "pika_leaf.py", "amqp", map[string]any{
		"server": m.URL(), "admin_token": testAdminToken, "tree": tree, "branch": branch,
		"amqp_host": host, "amqp_port": port, "leaves": leaves, "fixtures": fixturesAbs,
	})
}

// amqpLeaf is a logged-in leaf consuming its queue with amqp091.
type amqpLeaf struct {
	wireLeaf
	conn *amqp.Connection
	msgs <-chan amqp.Delivery
}

func (l *amqpLeaf) consume(tb testing.TB, amqpURL string) {
	tb.Helper()
	u, _ := url.Parse(amqpURL)
	u.User = url.UserPassword(l.id, l.token)
	u.Path = "/" + l.tree
	conn, err := amqp.DialConfig(u.String(), amqp.Config{Heartbeat: 30 * time.Second, Vhost: l.tree})
	if err != nil {
		tb.Fatalf("leaf %s connects right after login: %v", l.name, err)
	}
	ch, err := conn.Channel()
	if err != nil {
		tb.Fatal(err)
	}
	msgs, err := ch.Consume(l.id, "", false, false, false, false, nil)
	if err != nil {
		tb.Fatal(err)
	}
	l.conn, l.msgs = conn, msgs
	tb.Cleanup(func() { conn.Close() })
}

// TestRabbitMQ200Leaves logs 200 leaves in at once, each consuming its queue
// right after its login, and checks that one round notifies all 200. It
// measures the latency from the aggregation's record to the message in each
// consumer over several rounds, and logs p50 and p99.
func TestRabbitMQ200Leaves(t *testing.T) {
	amqpURL, _ := amqpURLs(t)
	const n, rounds = 200, 5
	m := MustRabbitServer(t, nil)
	a := MustAdmin(t, m.URL())
	ctx := context.Background()
	tree := uniqueName("tree")
	if _, err := a.CreateTree(ctx, tree); err != nil {
		t.Fatal(err)
	}
	branch := "b"
	if _, err := a.CreateBranch(ctx, tree, client.BranchSpec{ID: branch, MinUpdates: intp(2)}); err != nil {
		t.Fatal(err)
	}
	leaves := make([]*amqpLeaf, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 16)
	for i := range leaves {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			nl, err := a.CreateLeaf(ctx, tree, branch, uniqueName("leaf"), "")
			<-sem
			if err != nil {
				errs <- err
				return
			}
			leaves[i] = &amqpLeaf{wireLeaf: wireLeaf{server: m.URL(), name: nl.Name, password: nl.Password, tree: tree, branch: branch}}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// All 200 log in at once and connect as soon as their login answers.
	start := time.Now()
	errs = make(chan error, n)
	for _, l := range leaves {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := l.login(); err != nil {
				errs <- err
				return
			}
			l.consume(t, amqpURL)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("200 concurrent logins with broker provisioning and consumers connected in %.2fs", time.Since(start).Seconds())

	file, _ := float32Update(t, 10, 1000, 1)
	var lat []time.Duration
	for round := 1; round <= rounds; round++ {
		for _, l := range leaves[:2] {
			if _, _, err := l.upload(file, uniqueName("key")); err != nil {
				t.Fatal(err)
			}
		}
		got := make([]time.Time, n)
		var aggID string
		var mu sync.Mutex
		for i, l := range leaves {
			wg.Add(1)
			go func() {
				defer wg.Done()
				timeout := time.After(30 * time.Second)
				for {
					select {
					case d := <-l.msgs:
						recv := time.Now()
						d.Ack(false)
						var msg struct {
							Type string `json:"message_type"`
							Body struct {
								AggregationID string `json:"aggregation_id"`
								Round         int    `json:"round"`
							} `json:"body"`
						}
						if err := json.Unmarshal(d.Body, &msg); err != nil {
							t.Error(err)
							return
						}
						if msg.Type != "aggregation_status" || msg.Body.Round != round {
							continue
						}
						mu.Lock()
						aggID = msg.Body.AggregationID
						mu.Unlock()
						got[i] = recv
						return
					case <-timeout:
						t.Errorf("leaf %d got no aggregation_status for round %d", i, round)
						return
					}
				}
			}()
		}
		wg.Wait()
		aggs, err := a.ListAggregations(ctx, tree, branch)
		if err != nil {
			t.Fatal(err)
		}
		for _, ag := range aggs {
			if ag.ID == aggID {
				for _, r := range got {
					if !r.IsZero() {
						lat = append(lat, r.Sub(ag.FinishedAt))
					}
				}
			}
		}
	}
	if len(lat) != n*rounds {
		t.Fatalf("%d of %d notifications measured", len(lat), n*rounds)
	}
	slices.Sort(lat)
	t.Logf("aggregation record -> message in consumer, %d consumers x %d rounds: p50 %.1f ms, p99 %.1f ms, max %.1f ms",
		n, rounds, ms(lat[len(lat)/2]), ms(lat[len(lat)*99/100]), ms(lat[len(lat)-1]))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// TestDisruptiveBrokerRestart stops the broker (rabbitmqctl stop_app) while
// rounds complete, starts it again, and checks every notification arrives
// afterwards: the outbox keeps them until the broker confirms them.
func TestDisruptiveBrokerRestart(t *testing.T) {
	if os.Getenv("BRANCHKEY_TEST_DISRUPTIVE") != "1" {
		t.Skip("restarts the broker; runs with BRANCHKEY_TEST_DISRUPTIVE=1")
	}
	amqpURL, _ := amqpURLs(t)
	m := MustRabbitServer(t, nil)
	a := MustAdmin(t, m.URL())
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{MinUpdates: intp(2)}, 2)
	leaves := make([]*amqpLeaf, len(created))
	for i, c := range created {
		leaves[i] = &amqpLeaf{wireLeaf: wireLeaf{server: m.URL(), name: c.Name, password: c.Password, tree: tree, branch: branch}}
		if err := leaves[i].login(); err != nil {
			t.Fatal(err)
		}
	}
	rabbitmqctl := func(args ...string) {
		out, err := exec.Command("rabbitmqctl", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("rabbitmqctl %v: %v\n%s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("rabbitmqctl", "start_app").Run() })
	file, _ := float32Update(t, 10, 1000, 1)
	upload := func(round int) {
		for _, l := range leaves {
			if _, _, err := l.upload(file, uniqueName("key")); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		waitAggregation(t, a, tree, branch, round)
	}
	upload(1)
	rabbitmqctl("stop_app")
	for round := 2; round <= 4; round++ {
		upload(round) // uploads and rounds go on without the broker
	}
	rabbitmqctl("start_app")
	rabbitmqctl("await_startup")
	for _, l := range leaves {
		l.consume(t, amqpURL)
		seen := map[string]bool{}
		rounds := map[int]bool{}
		timeout := time.After(60 * time.Second)
		for len(rounds) < 4 {
			select {
			case d := <-l.msgs:
				d.Ack(false)
				if seen[d.MessageId] {
					continue // at-least-once: a duplicate is dropped by its id
				}
				seen[d.MessageId] = true
				var msg struct {
					Type string         `json:"message_type"`
					Body map[string]any `json:"body"`
				}
				json.NewDecoder(bytes.NewReader(d.Body)).Decode(&msg)
				if msg.Type == "aggregation_status" {
					rounds[int(msg.Body["round"].(float64))] = true
				}
			case <-timeout:
				t.Fatalf("leaf %s: notifications of rounds %v arrived, want 1-4", l.name, rounds)
			}
		}
	}
}

// managementStatus returns the status of a GET on the broker's management
// API.
func managementStatus(tb testing.TB, path string) int {
	tb.Helper()
	_, adminURL := amqpURLs(tb)
	u, _ := url.Parse(adminURL)
	pw, _ := u.User.Password()
	req, _ := http.NewRequest("GET", strings.TrimRight(adminURL, "/")+path, nil)
	req.SetBasicAuth(u.User.Username(), pw)
	req.URL.User = nil
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestRabbitMQTokenExpiry: when a leaf's token expires, its broker password
// is revoked and its open connection closed.
func TestRabbitMQTokenExpiry(t *testing.T) {
	amqpURL, _ := amqpURLs(t)
	m := MustRabbitServer(t, func(c *Config) { c.TokenTTL = 2 * time.Second })
	a := MustAdmin(t, m.URL())
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{}, 1)
	l := &amqpLeaf{wireLeaf: wireLeaf{server: m.URL(), name: created[0].Name, password: created[0].Password, tree: tree, branch: branch}}
	if err := l.login(); err != nil {
		t.Fatal(err)
	}
	l.consume(t, amqpURL)
	closed := l.conn.NotifyClose(make(chan *amqp.Error, 1))
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("the expired leaf's connection is still open")
	}
	u, _ := url.Parse(amqpURL)
	u.User = url.UserPassword(l.id, l.token)
	if _, err := amqp.DialConfig(u.String(), amqp.Config{Vhost: tree}); err == nil {
		t.Fatal("the expired token still connects")
	}
	if _, status, _ := l.download("x"); status != 401 {
		t.Fatalf("the expired token on HTTP: %d", status)
	}
}

// TestRabbitMQDeleteCleansBroker: deleting a leaf removes its broker user and
// queue; deleting a tree removes its virtual host.
func TestRabbitMQDeleteCleansBroker(t *testing.T) {
	m := MustRabbitServer(t, nil)
	a := MustAdmin(t, m.URL())
	ctx := context.Background()
	tree, branch, created := MustBranch(t, a, "", client.BranchSpec{}, 2)
	for _, c := range created {
		l := &wireLeaf{server: m.URL(), name: c.Name, password: c.Password, tree: tree, branch: branch}
		if err := l.login(); err != nil {
			t.Fatal(err)
		}
	}
	vhost := "/api/vhosts/" + url.PathEscape(tree)
	queue := func(id string) string { return "/api/queues/" + url.PathEscape(tree) + "/" + url.PathEscape(id) }
	for _, c := range created {
		if s := managementStatus(t, "/api/users/"+c.ID); s != 200 {
			t.Fatalf("user of leaf %s: %d", c.Name, s)
		}
		if s := managementStatus(t, queue(c.ID)); s != 200 {
			t.Fatalf("queue of leaf %s: %d", c.Name, s)
		}
	}
	if err := a.DeleteLeaf(ctx, tree, branch, created[0].Name); err != nil {
		t.Fatal(err)
	}
	if s := managementStatus(t, "/api/users/"+created[0].ID); s != 404 {
		t.Fatalf("user of a deleted leaf: %d", s)
	}
	if s := managementStatus(t, queue(created[0].ID)); s != 404 {
		t.Fatalf("queue of a deleted leaf: %d", s)
	}
	if err := a.DeleteTree(ctx, tree); err != nil {
		t.Fatal(err)
	}
	if s := managementStatus(t, vhost); s != 404 {
		t.Fatalf("vhost of a deleted tree: %d", s)
	}
	if s := managementStatus(t, "/api/users/"+created[1].ID); s != 404 {
		t.Fatalf("user of a leaf of a deleted tree: %d", s)
	}
}
