package service

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/aggregate"
	"github.com/branchkey/branchkey/weights"
)

// accumulator is the engine's incremental path, as rounds use it.
type accumulator interface {
	Add(ctx context.Context, in aggregate.Input) error
	WriteAggregate(ctx context.Context, out io.Writer) (*aggregate.Result, error)
}

// engineConfig returns the engine configuration of a branch's policy.
func engineConfig(p branchkey.Policy) (aggregate.Config, error) {
	cfg, err := aggregate.ParseConfig(p.Strategy, p.StrategyOptions)
	if err != nil {
		return cfg, err
	}
	// Uploads were checked for NaN and Inf as they arrived, under the
	// branch's policy, and stored files do not change: checking again
	// would only read every update once more.
	cfg.AllowNonFinite = true
	return cfg, nil
}

// incrementalOK reports whether a branch's rounds fold updates as they
// arrive: the strategy must work from a running sum, and every update of
// the round must be used (with sampling the inputs are only known at the
// end).
func incrementalOK(p branchkey.Policy) bool {
	cfg, err := engineConfig(p)
	return err == nil && !cfg.NeedsAll() && p.SampleSize == 0
}

// sample picks k of n indices uniformly without replacement, with a fresh
// random seed; the chosen inputs are recorded with the round.
func sample(n, k int) []int {
	return aggregate.Sample(n, k, rand.Int64())
}

// input names an update for the engine: its id (unique, as the accumulator
// requires) and the file name the leaf gave.
func (s *Service) input(u *branchkey.Update, blob branchkey.Blob) aggregate.Input {
	return aggregate.Input{Name: fmt.Sprintf("%s (%s, leaf %s)", u.ID, u.Filename, u.LeafID), R: blob, Size: blob.Size()}
}

// aux holds the global model and optimizer state a round may need, open.
type aux struct {
	opts   []aggregate.Option
	closer []io.Closer
	temp   []string // blobs to delete afterwards
	cfg    aggregate.Config
	// stateOut receives an accumulator's optimizer state; its target blob
	// is only known when the round aggregates.
	stateOut *lazyWriter
}

// lazyWriter writes to a writer chosen after it was handed out.
type lazyWriter struct{ w io.Writer }

func (l *lazyWriter) Write(p []byte) (int, error) {
	if l.w == nil {
		return 0, errors.New("optimizer state output not set")
	}
	return l.w.Write(p)
}

func (a *aux) close(s *Service, ctx context.Context) {
	for _, c := range a.closer {
		c.Close()
	}
	s.deleteBlobs(ctx, a.temp)
}

// openAux finds the branch's previous aggregate (the global model) and
// optimizer state, when the strategy needs them. A server optimizer's first
// round has no global model yet: it runs as plain fedavg, and its result
// becomes the first global model. dp-fedavg's first round clips and noises
// against an all-zero model, so even the first aggregate is private.
func (s *Service) openAux(ctx context.Context, b *branchkey.Branch, first *branchkey.Update) (*aux, error) {
	cfg, err := engineConfig(b.Policy)
	if err != nil {
		return nil, branchkey.Errorf(branchkey.EINVALID, "strategy: %v", err)
	}
	a := &aux{cfg: cfg}
	if !cfg.NeedsGlobal() {
		return a, nil
	}
	prev, err := s.store.LatestAggregation(ctx, b.TreeID, b.ID)
	if isCode(err, branchkey.ENOTFOUND) {
		if cfg.KeepsState() {
			a.cfg, _ = aggregate.ParseConfig(string(aggregate.FedAvg), nil)
			a.cfg.AllowNonFinite = cfg.AllowNonFinite
			return a, nil
		}
		g, key, err := s.zeroModel(ctx, first)
		if err != nil {
			return nil, err
		}
		a.temp = append(a.temp, key)
		a.closer = append(a.closer, g)
		a.opts = append(a.opts, aggregate.WithGlobal(aggregate.Input{Name: "zero model", R: g, Size: g.Size()}))
		return a, nil
	} else if err != nil {
		return nil, err
	}
	g, err := s.blobs.Open(ctx, prev.BlobKey)
	if err != nil {
		return nil, fmt.Errorf("open the global model %s: %w", prev.ID, err)
	}
	a.closer = append(a.closer, g)
	a.opts = append(a.opts, aggregate.WithGlobal(aggregate.Input{Name: "global model " + prev.ID, R: g, Size: g.Size()}))
	if cfg.KeepsState() && prev.StateKey != "" {
		st, err := s.blobs.Open(ctx, prev.StateKey)
		if err != nil {
			a.close(s, ctx)
			return nil, fmt.Errorf("open optimizer state of %s: %w", prev.ID, err)
		}
		a.closer = append(a.closer, st)
		a.opts = append(a.opts, aggregate.WithState(aggregate.Input{Name: "state " + prev.ID, R: st, Size: st.Size()}))
	}
	return a, nil
}

// zeroModel stores an update of the first update's layout with every value
// zero, and opens it.
func (s *Service) zeroModel(ctx context.Context, first *branchkey.Update) (branchkey.Blob, string, error) {
	ts, err := weights.ParseSignature(first.Signature)
	if err != nil {
		return nil, "", err
	}
	key := fmt.Sprintf("tmp/%s/%s/zero-%s.npy", first.TreeID, first.BranchID, randomHex(8))
	w, err := s.blobs.Create(ctx, key)
	if err != nil {
		return nil, "", err
	}
	enc, err := weights.NewEncoder(w, 1, ts)
	if err == nil {
		zeros := make([]byte, 64<<10)
		var total int64
		for i := range ts {
			total += ts[i].NBytes()
		}
		for total > 0 && err == nil {
			n := min(total, int64(len(zeros)))
			_, err = enc.Write(zeros[:n])
			total -= n
		}
		if err == nil {
			err = enc.Close()
		}
	}
	if err != nil {
		_ = w.Abort()
		return nil, "", err
	}
	if err := w.Commit(); err != nil {
		return nil, "", err
	}
	blob, err := s.blobs.Open(ctx, key)
	return blob, key, err
}

// newAccumulator starts a round's accumulator for a branch.
func (s *Service) newAccumulator(ctx context.Context, b *branchkey.Branch, first *branchkey.Update) (accumulator, *aux, error) {
	a, err := s.openAux(ctx, b, first)
	if err != nil {
		return nil, nil, err
	}
	opts := a.opts
	if a.cfg.KeepsState() {
		a.stateOut = &lazyWriter{}
		opts = append(opts, aggregate.WithStateOut(a.stateOut))
	}
	acc, err := aggregate.NewAccumulator(ctx, a.cfg, opts...)
	if err != nil {
		a.close(s, ctx)
		return nil, nil, err
	}
	return acc, a, nil
}

// engineOut is what the engine reports to the round's log line.
type engineOut struct {
	gbps float64
}

// runEngine aggregates a claimed round into agg's blob: from the round's
// running accumulator when it holds exactly the round's inputs, else
// blocked from the stored updates. It fills agg's results.
func (s *Service) runEngine(ctx context.Context, b *branchkey.Branch, r *branchkey.Round, agg *branchkey.Aggregation) (engineOut, error) {
	if len(r.Inputs) == 0 {
		return engineOut{}, branchkey.Errorf(branchkey.EINVALID, "round %d has no inputs", r.Round)
	}
	ups := make([]*branchkey.Update, len(r.Inputs))
	for i, id := range r.Inputs {
		u, err := s.store.FindUpdate(ctx, id)
		if err != nil {
			return engineOut{}, fmt.Errorf("input %s: %w", id, err)
		}
		ups[i] = u
	}
	out, err := s.blobs.Create(ctx, agg.BlobKey)
	if err != nil {
		return engineOut{}, err
	}
	committed := false
	defer func() {
		if !committed {
			_ = out.Abort()
		}
	}()

	var res *aggregate.Result
	var state branchkey.BlobWriter
	if ra := s.takeAcc(r.RoundKey, r.Inputs); ra != nil {
		defer ra.aux.close(s, ctx)
		if ra.aux.cfg.KeepsState() {
			if state, err = s.stateWriter(ctx, agg, ra.aux); err != nil {
				return engineOut{}, err
			}
		}
		res, err = ra.acc.WriteAggregate(ctx, out)
	} else {
		a, err2 := s.openAux(ctx, b, ups[0])
		if err2 != nil {
			return engineOut{}, err2
		}
		defer a.close(s, ctx)
		inputs := make([]aggregate.Input, len(ups))
		for i, u := range ups {
			blob, err := s.blobs.Open(ctx, u.BlobKey)
			if err != nil {
				return engineOut{}, fmt.Errorf("open update %s: %w", u.ID, err)
			}
			defer blob.Close()
			inputs[i] = s.input(u, blob)
		}
		opts := a.opts
		if a.cfg.KeepsState() {
			if state, err = s.stateWriter(ctx, agg, a); err != nil {
				return engineOut{}, err
			}
			opts = append(opts, aggregate.WithStateOut(state))
		}
		res, err = aggregate.Aggregate(ctx, a.cfg, inputs, out, opts...)
	}
	if err != nil {
		if state != nil {
			_ = state.Abort()
		}
		var ie *aggregate.InputError
		var ce *aggregate.ConfigError
		if errors.As(err, &ie) || errors.As(err, &ce) {
			return engineOut{}, branchkey.Errorf(branchkey.EINVALID, "%v", err)
		}
		return engineOut{}, err
	}
	if state != nil {
		if err := state.Commit(); err != nil {
			return engineOut{}, fmt.Errorf("store optimizer state: %w", err)
		}
	}
	if err := out.Commit(); err != nil {
		s.deleteBlobs(ctx, []string{agg.StateKey})
		return engineOut{}, fmt.Errorf("store aggregate: %w", err)
	}
	committed = true
	agg.NumSamples = res.NumSamples
	agg.Mode = res.Mode
	agg.Size = res.BytesWritten
	return engineOut{gbps: res.GBps()}, nil
}

// stateWriter creates the blob for a server optimizer's state after this
// round and sets it as the accumulator's or engine's state output.
func (s *Service) stateWriter(ctx context.Context, agg *branchkey.Aggregation, a *aux) (branchkey.BlobWriter, error) {
	agg.StateKey = fmt.Sprintf("state/%s/%s/%s.npy", agg.TreeID, agg.BranchID, agg.ID)
	w, err := s.blobs.Create(ctx, agg.StateKey)
	if err != nil {
		return nil, err
	}
	if a.stateOut != nil {
		a.stateOut.w = w
	}
	return w, nil
}
