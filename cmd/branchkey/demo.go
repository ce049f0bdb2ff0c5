package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/branchkey/branchkey/demo"
	"github.com/branchkey/branchkey/weights"
	"github.com/spf13/cobra"
	"golang.org/x/sync/errgroup"
)

// demoConfig are the demo's flags.
type demoConfig struct {
	leaves   int
	rounds   int
	strategy string
	options  []string
	keep     bool
	amqpURL  string
	json     bool
	seed     uint64
	epochs   int
	dir      string
}

func newDemoCmd() *cobra.Command {
	c := demoConfig{}
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Train a classifier across simulated leaves on an embedded server",
		Long: `demo shows the whole system at work in one command. It starts an embedded
server in a temporary directory, creates a tree, a branch and --leaves leaves,
and runs that many simulated leaves in this process. Each leaf logs in, trains a
small neural network in plain Go on its own share of the UCI handwritten digits
(split so that leaves see mostly a few digits, in unequal amounts), uploads its
weights through the HTTP API, waits for the notification that the round's
aggregate is ready (Server-Sent Events, or RabbitMQ with --amqp-url), downloads
it and trains on from it, for --rounds rounds. After each round the global
model's accuracy on held-out digits is printed.

With --json, one JSON object per round goes to stdout and the rest to stderr.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDemo(cmd.Context(), c, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	fl.IntVar(&c.leaves, "leaves", 4, "number of simulated leaves (1 to 64)")
	fl.IntVar(&c.rounds, "rounds", 5, "number of rounds")
	fl.StringVar(&c.strategy, "strategy", "fedavg", "aggregation strategy (see branchkey aggregate --help)")
	fl.StringArrayVarP(&c.options, "option", "o", nil, "strategy option KEY=VALUE (repeatable)")
	fl.BoolVar(&c.keep, "keep", false, "keep the server's data directory at the end")
	fl.StringVar(&c.amqpURL, "amqp-url", os.Getenv("BRANCHKEY_AMQP_URL"), "notify leaves through this RabbitMQ (amqp://USER:PASS@HOST:5672/) instead of SSE")
	fl.BoolVar(&c.json, "json", false, "print one JSON object per round on stdout")
	fl.Uint64Var(&c.seed, "seed", 1, "seed of the data split, the model and training")
	fl.IntVar(&c.epochs, "epochs", demo.DefaultEpochs, "local epochs per round")
	fl.StringVar(&c.dir, "data", "", "data directory (default: a new temporary one)")
	return cmd
}

// demoRound is what the demo reports after each round.
type demoRound struct {
	Round          int     `json:"round"`
	Accuracy       float64 `json:"accuracy"`
	Loss           float64 `json:"loss"`
	Updates        int     `json:"updates"`
	Samples        int64   `json:"samples"`
	AggregationSec float64 `json:"aggregation_seconds"`
	Mode           string  `json:"mode"`
	Aggregation    string  `json:"aggregation_id"`
	Seconds        float64 `json:"seconds"`
}

func runDemo(ctx context.Context, c demoConfig, stdout, stderr io.Writer) (err error) {
	if c.leaves < 1 || c.leaves > 64 {
		return fmt.Errorf("--leaves %d: use 1 to 64", c.leaves)
	}
	if c.rounds < 1 {
		return fmt.Errorf("--rounds %d: use at least 1", c.rounds)
	}
	say := stdout
	if c.json {
		say = stderr
	}
	start := time.Now()

	// The embedded server, exactly as "branchkey serve" runs, in a
	// temporary directory.
	dir := c.dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "branchkey-demo-"); err != nil {
			return err
		}
		if !c.keep {
			defer os.RemoveAll(dir)
		}
	}
	token := randomToken()
	m := NewMain()
	m.Config.Addr = "127.0.0.1:0"
	m.Config.Data = dir
	m.Config.AdminToken = token
	m.Config.LogFormat = "text"
	m.Config.PollInterval = 100 * time.Millisecond
	m.Config.AMQPURL = c.amqpURL
	logFile, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return err
	}
	defer logFile.Close()
	m.LogOutput = logFile
	if err := m.Run(ctx); err != nil {
		return fmt.Errorf("start the embedded server: %w", err)
	}
	defer m.Close()
	if err := os.WriteFile(filepath.Join(dir, "admin-token"), []byte(token+"\n"), 0o600); err != nil {
		return err
	}
	notify := "Server-Sent Events"
	if c.amqpURL != "" {
		notify = "RabbitMQ"
	}
	fmt.Fprintf(say, "branchkey demo: server on %s (data %s), notifications over %s\n", m.URL(), dir, notify)

	// A tree, a branch that aggregates once every leaf uploaded, and the
	// leaves, through the admin API.
	admin, err := client.NewAdmin(m.URL(), token, nil)
	if err != nil {
		return err
	}
	spec := client.BranchSpec{ID: "digits", MinUpdates: &c.leaves, Strategy: c.strategy, StrategyOptions: map[string]string{}}
	for _, o := range c.options {
		k, v, ok := cutOption(o)
		if !ok {
			return fmt.Errorf("--option %q: use KEY=VALUE", o)
		}
		spec.StrategyOptions[k] = v
	}
	// On a shared broker the tree is a virtual host other demos may use:
	// give this one its own, and remove it at the end.
	tree := "demo"
	if c.amqpURL != "" {
		tree = "demo-" + randomToken()[:8]
		if !c.keep {
			defer admin.DeleteTree(context.WithoutCancel(ctx), tree)
		}
	}
	if _, err := admin.CreateTree(ctx, tree); err != nil {
		return err
	}
	if _, err := admin.CreateBranch(ctx, tree, spec); err != nil {
		return err
	}

	// The data: UCI digits, 80/20 split, the training part spread over the
	// leaves with label skew and unequal sizes.
	all, err := demo.LoadDigits()
	if err != nil {
		return err
	}
	train, test := demo.SplitTrainTest(all, demo.DefaultTestFraction, c.seed)
	shares, err := demo.Partition(train, c.leaves, demo.DefaultAlpha, c.seed)
	if err != nil {
		return err
	}
	leaves := make([]*demoLeaf, c.leaves)
	for i := range leaves {
		nl, err := admin.CreateLeaf(ctx, tree, "digits", fmt.Sprintf("leaf-%d", i+1), "")
		if err != nil {
			return err
		}
		creds := client.Credentials{LeafName: nl.Name, LeafPassword: nl.Password, TreeID: tree, BranchID: "digits"}
		if c.amqpURL != "" {
			u, err := url.Parse(c.amqpURL)
			if err != nil {
				return fmt.Errorf("--amqp-url: %w", err)
			}
			creds.Host = u.Hostname()
			creds.Port, _ = strconv.Atoi(u.Port())
		}
		leaves[i] = &demoLeaf{index: i, creds: creds, samples: shares[i], dir: filepath.Join(dir, "leaves", nl.Name),
			rng: mrand.New(mrand.NewPCG(c.seed, uint64(i)))}
		fmt.Fprintf(say, "  %s: %4d training digits, mostly %s\n", nl.Name, len(shares[i]), topLabels(shares[i]))
	}
	fmt.Fprintf(say, "%d leaves x %d rounds, strategy %s, %d local epochs per round, %d test digits\n",
		c.leaves, c.rounds, c.strategy, c.epochs, len(test))
	if !c.json {
		fmt.Fprintf(say, "%5s  %8s  %6s  %7s  %7s  %9s  %-11s\n", "round", "accuracy", "loss", "updates", "samples", "aggregate", "mode")
	}

	// Every leaf starts from the same model, as a federation does.
	initial := demo.NewModel(demo.DefaultHidden, c.seed).Tensors()
	results := make(chan demoResult, c.leaves*c.rounds)
	g, gctx := errgroup.WithContext(ctx)
	for _, l := range leaves {
		g.Go(func() error { return l.run(gctx, m.URL(), initial, c, results) })
	}
	errc := make(chan error, 1)
	go func() { errc <- g.Wait(); close(results) }()

	// After each round, the global model, as every leaf got it, on the
	// held-out digits.
	var prev float64
	byRound := map[int][]demoResult{}
	reported := 0
	for r := range results {
		byRound[r.round] = append(byRound[r.round], r)
		for len(byRound[reported+1]) == c.leaves {
			reported++
			rs := byRound[reported]
			for _, other := range rs[1:] {
				if other.aggregation != rs[0].aggregation {
					return fmt.Errorf("round %d: leaves loaded different aggregates", reported)
				}
			}
			acc, loss := demo.Evaluate(rs[0].model, test)
			row := demoRound{Round: reported, Accuracy: round4(acc), Loss: round4(loss), Aggregation: rs[0].aggregation,
				Seconds: round4(time.Since(start).Seconds())}
			if ag, err := findAggregation(ctx, admin, tree, rs[0].aggregation); err == nil {
				row.Updates, row.Samples, row.Mode = len(ag.Inputs), ag.NumSamples, ag.Mode
				row.AggregationSec = ag.Duration.Seconds()
			}
			if c.json {
				b, _ := json.Marshal(row)
				fmt.Fprintln(stdout, string(b))
			} else {
				trend := ""
				if reported > 1 {
					trend = fmt.Sprintf(" (%+.3f)", acc-prev)
				}
				fmt.Fprintf(say, "%5d  %8.3f  %6.3f  %7d  %7d  %8.1fms  %-11s%s\n", row.Round, acc, loss, row.Updates, row.Samples,
					1000*row.AggregationSec, row.Mode, trend)
			}
			prev = acc
		}
	}
	if err := <-errc; err != nil {
		return err
	}
	fmt.Fprintf(say, "done in %.1fs: the global model classifies %.1f%% of the held-out digits correctly.\n", time.Since(start).Seconds(), 100*prev)
	if c.keep {
		fmt.Fprintf(say, "The server's data (SQLite database, files, log) is in %s. Serve it again with:\n", dir)
		fmt.Fprintf(say, "  BRANCHKEY_ADMIN_TOKEN=$(cat %s) branchkey serve --data %s\n", filepath.Join(dir, "admin-token"), dir)
		fmt.Fprintf(say, "then look around with: branchkey admin branch show %s digits\n", tree)
	} else {
		fmt.Fprintf(say, "The server's data was in %s and is removed now; run with --keep to keep it and serve it with\n", dir)
		fmt.Fprintf(say, "  BRANCHKEY_ADMIN_TOKEN=$(cat DIR/admin-token) branchkey serve --data DIR\n")
	}
	return nil
}

func cutOption(o string) (string, string, bool) {
	for i := range o {
		if o[i] == '=' {
			return o[:i], o[i+1:], i > 0
		}
	}
	return "", "", false
}

func round4(x float64) float64 { return math.Round(x*1e4) / 1e4 }

func randomToken() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// topLabels names the two digits a share holds most of.
func topLabels(s []demo.Sample) string {
	var count [demo.NumClasses]int
	for _, x := range s {
		count[x.Label]++
	}
	best, second := -1, -1
	for d, n := range count {
		if best < 0 || n > count[best] {
			best, second = d, best
		} else if second < 0 || n > count[second] {
			second = d
		}
	}
	return fmt.Sprintf("%d (%d%%) and %d (%d%%)", best, 100*count[best]/max(len(s), 1), second, 100*count[second]/max(len(s), 1))
}

func findAggregation(ctx context.Context, a *client.Admin, tree, id string) (*branchkey.Aggregation, error) {
	aggs, err := a.ListAggregations(ctx, tree, "digits")
	if err != nil {
		return nil, err
	}
	for _, ag := range aggs {
		if ag.ID == id {
			return ag, nil
		}
	}
	return nil, errors.New("aggregation not listed")
}

// demoLeaf is one simulated training site.
type demoLeaf struct {
	index   int
	creds   client.Credentials
	samples []demo.Sample
	dir     string
	rng     *mrand.Rand
}

// demoResult is a leaf's global model after a round.
type demoResult struct {
	round       int
	aggregation string
	model       *demo.Model
}

// run is a leaf's life: log in, then each round train, upload, wait for the
// aggregate's notification, download it and continue from it.
func (l *demoLeaf) run(ctx context.Context, server string, initial []demo.Tensor, c demoConfig, out chan<- demoResult) error {
	cl, err := client.New(l.creds, client.WithServer(server), client.WithDownloadDir(filepath.Join(l.dir, "aggregated_files")))
	if err != nil {
		return err
	}
	defer cl.Close()
	if err := cl.Login(ctx); err != nil {
		return fmt.Errorf("%s: login: %w", l.creds.LeafName, err)
	}
	defer cl.Logout(context.WithoutCancel(ctx))
	model, err := demo.ModelFromTensors(initial)
	if err != nil {
		return err
	}
	for round := 1; round <= c.rounds; round++ {
		demo.Train(model, l.samples, c.epochs, demo.DefaultLR, demo.DefaultBatch, l.rng)
		path := filepath.Join(l.dir, fmt.Sprintf("update-%d.npy", round))
		if err := writeModel(path, model, int64(len(l.samples))); err != nil {
			return err
		}
		if _, err := cl.FileUpload(ctx, path); err != nil {
			return fmt.Errorf("%s: round %d: upload: %w", l.creds.LeafName, round, err)
		}
		aggID, err := waitAggregate(ctx, cl, round)
		if err != nil {
			return fmt.Errorf("%s: round %d: %w", l.creds.LeafName, round, err)
		}
		file, err := cl.FileDownload(ctx, aggID)
		if err != nil {
			return fmt.Errorf("%s: round %d: download: %w", l.creds.LeafName, round, err)
		}
		if model, err = readModel(file); err != nil {
			return fmt.Errorf("%s: round %d: %w", l.creds.LeafName, round, err)
		}
		// The leaf trains on from model; the report gets its own copy.
		global, err := demo.ModelFromTensors(model.Tensors())
		if err != nil {
			return err
		}
		select {
		case out <- demoResult{round: round, aggregation: aggID, model: global}:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// waitAggregate waits for the notification of a round's aggregate.
func waitAggregate(ctx context.Context, cl *client.Client, round int) (string, error) {
	timeout := time.NewTimer(2 * time.Minute)
	defer timeout.Stop()
	for {
		select {
		case n, ok := <-cl.Updates():
			if !ok {
				return "", fmt.Errorf("notifications stopped: %v", cl.Err())
			}
			if n.Type == branchkey.MessageAggregationStatus && n.Round == round {
				return n.AggregationID, nil
			}
		case <-timeout.C:
			return "", errors.New("no aggregate announced within 2 minutes")
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
}

// writeModel saves a model as a weights file, as a leaf's training code
// would with np.save.
func writeModel(path string, m *demo.Model, samples int64) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	u := &weights.Update{NumSamples: samples}
	for _, t := range m.Tensors() {
		data := make([]byte, 4*len(t.Data))
		for i, v := range t.Data {
			putFloat32(data[4*i:], v)
		}
		u.Tensors = append(u.Tensors, weights.Tensor{DType: weights.Float32, Shape: t.Shape, Data: data})
	}
	return weights.WriteFile(path, u)
}

// readModel loads a downloaded aggregate into a model.
func readModel(path string) (*demo.Model, error) {
	u, err := weights.ReadFile(path)
	if err != nil {
		return nil, err
	}
	ts := make([]demo.Tensor, len(u.Tensors))
	for i, t := range u.Tensors {
		vals := make([]float64, t.Len())
		t.DType.ToFloat64(vals, t.Data)
		f := make([]float32, len(vals))
		for k, v := range vals {
			f[k] = float32(v)
		}
		ts[i] = demo.Tensor{Shape: t.Shape, Data: f}
	}
	return demo.ModelFromTensors(ts)
}

func putFloat32(b []byte, v float32) {
	bits := math.Float32bits(v)
	b[0], b[1], b[2], b[3] = byte(bits), byte(bits>>8), byte(bits>>16), byte(bits>>24)
}
