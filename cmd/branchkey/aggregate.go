package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// aggregateFlags are the aggregate command's options other than the
// strategy's own, which go to aggregate.ParseConfig by name.
type aggregateFlags struct {
	strategy    string
	out         string
	global      string
	state       string
	sample      int
	asJSON      bool
	incremental bool
	sync        bool
	workers     int
	blockSize   int
}

// strategyFlags are the flags passed to aggregate.ParseConfig under their
// own names when given.
var strategyFlags = []string{
	aggregate.OptTrim, aggregate.OptByzantine, aggregate.OptSelect,
	aggregate.OptServerLR, aggregate.OptMomentum, aggregate.OptBeta1, aggregate.OptBeta2, aggregate.OptTau,
	aggregate.OptClip, aggregate.OptNoiseMultiplier, aggregate.OptSeed, aggregate.OptAllowNonFinite,
}

func newAggregateCmd() *cobra.Command {
	var f aggregateFlags
	cmd := &cobra.Command{
		Use:   "aggregate [--strategy S ...] [--sample K --seed S] -o OUT.npy FILE...",
		Short: "Aggregate weights files into one, as the server does at the end of a round",
		Long:  aggregateLong(),
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			opts := map[string]string{}
			cmd.Flags().Visit(func(fl *pflag.Flag) {
				if slices.Contains(strategyFlags, fl.Name) {
					opts[fl.Name] = fl.Value.String()
				}
			})
			// --seed also seeds --sample; only dp-fedavg uses it in the
			// strategy, and every strategy accepts it.
			cfg, err := aggregate.ParseConfig(f.strategy, opts)
			if err != nil {
				return &exitError{code: 2, msg: "aggregate: " + err.Error()}
			}
			seed, _ := cmd.Flags().GetInt64(aggregate.OptSeed)
			return runAggregate(cmd.Context(), cmd.OutOrStdout(), cfg, f, seed, args)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.strategy, "strategy", "fedavg", "aggregation strategy: "+strategyNames())
	fl.StringVarP(&f.out, "output", "o", "", "write the aggregate to this file (required)")
	fl.StringVar(&f.global, "global", "", "the previous global model (server optimizers, dp-fedavg)")
	fl.StringVar(&f.state, "state", "", "server optimizer state: read if it exists, then replaced with the new state")
	fl.IntVar(&f.sample, "sample", 0, "aggregate K of the files, chosen uniformly without replacement by --seed (0: all)")
	fl.Int64(aggregate.OptSeed, 0, "seed of --sample and of dp-fedavg's noise")
	fl.BoolVar(&f.asJSON, "json", false, "print the summary as JSON")
	fl.BoolVar(&f.sync, "sync", true, "fsync the output (and state) before renaming it into place; --sync=false leaves that to the OS, as np.save does")
	fl.BoolVar(&f.incremental, "incremental", false, "fold the files one by one into a running sum (the server's per-upload path) instead of reading them in blocks")
	fl.IntVar(&f.workers, "workers", 0, "goroutines combining blocks (0: one per core)")
	fl.IntVar(&f.blockSize, "block-size", 0, fmt.Sprintf("parameters combined at once per worker (0: %d)", aggregate.DefaultBlockSize))
	fl.Float64(aggregate.OptTrim, 0.1, "trimmed-mean: fraction cut at each end, in [0, 0.5)")
	fl.Int(aggregate.OptByzantine, 1, "krum, multi-krum: number of malicious updates to tolerate")
	fl.Int(aggregate.OptSelect, 0, "multi-krum: number of updates averaged (0: N-byzantine)")
	fl.Float64(aggregate.OptServerLR, 0, "server optimizers: server learning rate (default per strategy)")
	fl.Float64(aggregate.OptMomentum, 0.9, "fedavgm: server momentum")
	fl.Float64(aggregate.OptBeta1, 0.9, "fedadam, fedyogi, fedadagrad: first-moment decay (fedadagrad's default is 0)")
	fl.Float64(aggregate.OptBeta2, 0.99, "fedadam, fedyogi: second-moment decay")
	fl.Float64(aggregate.OptTau, 0, "fedadam, fedyogi, fedadagrad: adaptivity (default per strategy)")
	fl.Float64(aggregate.OptClip, 0, "dp-fedavg: L2 bound of each update's delta (required)")
	fl.Float64(aggregate.OptNoiseMultiplier, 0, "dp-fedavg: noise standard deviation in units of clip/K (required)")
	fl.Bool(aggregate.OptAllowNonFinite, false, "accept updates holding NaN or Inf")
	cmd.MarkFlagRequired("output")
	return cmd
}

func strategyNames() string {
	var names []string
	for _, s := range aggregate.Strategies() {
		names = append(names, string(s.Name))
	}
	return strings.Join(names, ", ")
}

func aggregateLong() string {
	var b strings.Builder
	b.WriteString(`aggregate combines weights files (updates) into one with the chosen strategy
and writes it in the same format, as the server does when a round closes. It
reads the files in blocks of parameters on every core, so memory stays far
below one model whatever the number of files; --incremental folds them one by
one into a running sum instead, as the server does per upload. Files are
combined in name order, so the result does not depend on their order. It
prints one line: updates used, num_samples, seconds and GB/s read (--json:
the same as a JSON object). Exit status 1 for a file that is malformed,
disagrees with the others or holds NaN/Inf; 2 for bad options.

Strategies:
`)
	for _, s := range aggregate.Strategies() {
		fmt.Fprintf(&b, "\n  %s\n", s.Name)
		line := "   "
		for _, w := range strings.Fields(s.Doc) {
			if len(line)+1+len(w) > 78 {
				b.WriteString(line + "\n")
				line = "   "
			}
			line += " " + w
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

// aggregateSummary is the aggregate command's JSON output.
type aggregateSummary struct {
	Output       string   `json:"output"`
	Strategy     string   `json:"strategy"`
	Mode         string   `json:"mode"`
	UpdatesUsed  int      `json:"updates_used"`
	Updates      []string `json:"updates"`
	Selected     []string `json:"selected,omitempty"`
	NumSamples   int64    `json:"num_samples"`
	Params       int64    `json:"params"`
	BytesRead    int64    `json:"bytes_read"`
	BytesWritten int64    `json:"bytes_written"`
	Seconds      float64  `json:"seconds"`
	GBps         float64  `json:"gbps"`
	StateRound   int64    `json:"state_round,omitempty"`
}

func runAggregate(ctx context.Context, stdout io.Writer, cfg aggregate.Config, f aggregateFlags, seed int64, files []string) error {
	files = slices.Clone(files)
	slices.Sort(files)
	if f.sample > len(files) {
		return &exitError{code: 2, msg: fmt.Sprintf("aggregate: --sample %d is more than the %d files", f.sample, len(files))}
	}
	if f.sample < 0 {
		return &exitError{code: 2, msg: fmt.Sprintf("aggregate: --sample must be at least 0, got %d", f.sample)}
	}
	var chosen []string
	for _, i := range aggregate.Sample(len(files), f.sample, seed) {
		chosen = append(chosen, files[i])
	}
	var inputs []aggregate.Input
	for _, p := range chosen {
		in, closeFn, err := openInput(p)
		if err != nil {
			return err
		}
		defer closeFn()
		inputs = append(inputs, in)
	}
	opts := []aggregate.Option{aggregate.WithWorkers(f.workers), aggregate.WithBlockSize(f.blockSize)}
	if f.global != "" {
		in, closeFn, err := openInput(f.global)
		if err != nil {
			return err
		}
		defer closeFn()
		opts = append(opts, aggregate.WithGlobal(in))
	} else if cfg.NeedsGlobal() {
		return &exitError{code: 2, msg: fmt.Sprintf("aggregate: %s needs the previous global model: --global FILE", cfg.Strategy)}
	}
	var stateOut outputFile
	if f.state != "" && cfg.KeepsState() {
		in, closeFn, err := openInput(f.state)
		switch {
		case err == nil:
			defer closeFn()
			opts = append(opts, aggregate.WithState(in))
		case !errors.Is(err, os.ErrNotExist):
			return err
		}
		if stateOut, err = createOutput(f.state, f.sync); err != nil {
			return err
		}
		defer stateOut.Abort()
		opts = append(opts, aggregate.WithStateOut(stateOut))
	}
	out, err := createOutput(f.out, f.sync)
	if err != nil {
		return err
	}
	defer out.Abort()

	var res *aggregate.Result
	if f.incremental {
		var acc *aggregate.Accumulator
		if acc, err = aggregate.NewAccumulator(ctx, cfg, opts...); err == nil {
			for _, in := range inputs {
				if err = acc.Add(ctx, in); err != nil {
					break
				}
			}
			if err == nil {
				res, err = acc.WriteAggregate(ctx, out)
			}
		}
	} else {
		res, err = aggregate.Aggregate(ctx, cfg, inputs, out, opts...)
	}
	if err != nil {
		var ce *aggregate.ConfigError
		if errors.As(err, &ce) {
			return &exitError{code: 2, msg: "aggregate: " + err.Error()}
		}
		return &exitError{code: 1, msg: "aggregate: " + err.Error()}
	}
	if err := out.Commit(); err != nil {
		return err
	}
	if stateOut != nil {
		if err := stateOut.Commit(); err != nil {
			return err
		}
	}
	sum := aggregateSummary{
		Output: f.out, Strategy: string(res.Strategy), Mode: res.Mode,
		UpdatesUsed: len(res.Updates), Updates: res.Updates, Selected: res.Selected,
		NumSamples: res.NumSamples, Params: res.Params,
		BytesRead: res.BytesRead, BytesWritten: res.BytesWritten,
		Seconds: res.Duration.Seconds(), GBps: res.GBps(), StateRound: res.StateRound,
	}
	if f.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(sum)
	}
	sel := ""
	if res.Selected != nil {
		sel = fmt.Sprintf(" selected=%s", strings.Join(res.Selected, ","))
	}
	_, err = fmt.Fprintf(stdout, "%s: %s (%s) of %d updates: num_samples=%d params=%d seconds=%.3f GB/s=%.2f%s\n",
		f.out, res.Strategy, res.Mode, len(res.Updates), res.NumSamples, res.Params, sum.Seconds, sum.GBps, sel)
	return err
}

// openInput opens a weights file as an aggregate.Input named by its path.
func openInput(path string) (aggregate.Input, func(), error) {
	fh, err := os.Open(path)
	if err != nil {
		return aggregate.Input{}, nil, err
	}
	fi, err := fh.Stat()
	if err != nil {
		fh.Close()
		return aggregate.Input{}, nil, err
	}
	return aggregate.Input{Name: path, R: fh, Size: fi.Size()}, func() { fh.Close() }, nil
}

// outputFile is an output written whole or not at all (weights.OutputFile).
type outputFile interface {
	io.Writer
	Commit() error
	Abort()
}

// createOutput starts an output file. With sync it is weights.OutputFile,
// synced before it is renamed into place. Without, a regular file is still
// written beside its path and renamed, so a failed run leaves nothing, but
// not synced: np.save does not sync either, and for a model of hundreds of
// MB the sync can cost more than the aggregation.
func createOutput(path string, sync bool) (outputFile, error) {
	if fi, err := os.Stat(path); sync || (err == nil && !fi.Mode().IsRegular()) {
		return weights.CreateOutput(path) // devices and pipes are written in place
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return nil, err
	}
	return &unsyncedOutput{f: f, path: path}, nil
}

// unsyncedOutput is a temporary file renamed into place without a sync.
type unsyncedOutput struct {
	f    *os.File
	path string
	done bool
}

func (o *unsyncedOutput) Write(p []byte) (int, error) { return o.f.Write(p) }

func (o *unsyncedOutput) Commit() error {
	if o.done {
		return errors.New("output already committed or aborted")
	}
	o.done = true
	err := o.f.Close()
	if err == nil {
		err = os.Rename(o.f.Name(), o.path)
	}
	if err != nil {
		os.Remove(o.f.Name())
	}
	return err
}

func (o *unsyncedOutput) Abort() {
	if !o.done {
		o.done = true
		o.f.Close()
		os.Remove(o.f.Name())
	}
}
