package aggregate

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"
)

// Accumulator aggregates a round incrementally: each update is folded into
// a running float64 sum as it arrives, so memory is one accumulator (8 bytes
// per parameter) whatever the number of updates, and the result is ready as
// soon as the last one is in. It serves the strategies that a running sum
// suffices for: fedavg, fedavg-unweighted, the server optimizers (fedavgm,
// fedadam, fedyogi, fedadagrad: the optimizer step needs only the round's
// mean) and dp-fedavg (each update's clipping factor is computed from the
// update and the global model alone, so its clipped delta can be added at
// once; noise is added at the end). Median, trimmed-mean, krum and
// multi-krum need all updates at once and run only through Aggregate.
//
// Updates are summed in the order they are added. Aggregate sorts its
// inputs by name first, so its result is the same whatever their order; an
// Accumulator's can differ in the last bit of a float64 sum when the same
// updates arrive in another order (a float32 result, rounded from it, only
// when that bit decides a rounding), and equals Aggregate's when they are
// added in name order.
//
// An Accumulator is safe for concurrent use; Adds are serialized.
type Accumulator struct {
	mu      sync.Mutex
	e       *engine
	acc     []float64
	names   []string
	samples int64
	sumF    float64
	sumI    float64
	sumC    float64
	spent   time.Duration
	broken  error
}

// NewAccumulator starts a round's accumulator for cfg. The options are
// those of Aggregate; the global model, when the strategy needs one, is
// required here, since dp-fedavg clips each update against it as it arrives.
func NewAccumulator(ctx context.Context, cfg Config, opts ...Option) (*Accumulator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.NeedsAll() {
		return nil, &ConfigError{Strategy: string(cfg.Strategy), Msg: "needs all updates at once; it cannot run incrementally"}
	}
	e := &engine{cfg: cfg, o: buildOptions(opts)}
	if err := e.openAux(ctx); err != nil {
		return nil, err
	}
	return &Accumulator{e: e}, nil
}

// Add folds one update into the sum. It indexes in (unless in.Update is
// set), checks that it agrees with the first update added (or the global
// model) and, unless the Config allows them, that it holds no NaN or Inf;
// an update that fails those checks is refused with an *InputError and
// leaves the sum as it was. Checking reads the update once and folding
// reads it again, so a refused update never touches the sum. A name added
// before is refused with ErrDuplicate. ctx can stop Add until folding
// starts; the fold itself runs to its end. A read error while folding
// leaves the sum unknown: that Add and every later call return ErrBroken.
func (a *Accumulator) Add(ctx context.Context, in Input) error {
	t0 := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	defer func() { a.spent += time.Since(t0) }()
	if a.broken != nil {
		return a.broken
	}
	if slices.Contains(a.names, in.Name) {
		return &InputError{Role: roleUpdate, Input: in.Name, Tensor: -1, Kind: ErrDuplicate, Msg: "was added before"}
	}
	e := a.e
	s, err := open(ctx, in, roleUpdate)
	if err != nil {
		return err
	}
	l := e.l
	if l == nil {
		l = newLayout(s.u, "the first update's")
	}
	if err := l.check(s); err != nil {
		return err
	}
	prev := e.l
	e.l = l // the checks below walk the layout
	s.wf, s.wi = float64(s.u.NumSamples), float64(s.u.NumSamples)
	switch e.cfg.Strategy {
	case FedAvgUnweighted:
		s.wf, s.wi = 1, 1
	case DPFedAvg:
		err = e.clipWeights(ctx, []*source{s}) // checks finiteness too
	}
	if err == nil && e.cfg.Strategy != DPFedAvg && !e.cfg.AllowNonFinite {
		err = e.run(ctx, e.o.block, func(w *worker, start int64, n int) error {
			w.segs = e.l.segments(w.segs, start, n)
			return e.checkFinite(w, s)
		}, nil)
	}
	if err != nil {
		e.l = prev
		return err
	}
	if a.acc == nil {
		a.acc = make([]float64, l.params())
	}
	// Once folding starts it runs to the end, cancelled or not: half an
	// update in the sum would break the round.
	err = e.run(context.WithoutCancel(ctx), e.o.block, func(w *worker, start int64, n int) error {
		w.segs = e.l.segments(w.segs, start, n)
		nr, err := s.read(w.segs, &w.buf, &w.views)
		e.read.Add(nr)
		if err != nil {
			return err
		}
		acc := a.acc[start : start+int64(n)]
		tmp := grow(&w.tmp, n)
		for i, sg := range w.segs {
			wt := s.wf
			if !l.float[sg.k] {
				wt = s.wi
			}
			addScaled(acc[sg.pos:sg.pos+sg.n], w.views[i], s.u.Tensors[sg.k].DType, wt, tmp)
		}
		return nil
	}, nil)
	if err != nil {
		a.broken = fmt.Errorf("%w: %w", ErrBroken, err)
		return a.broken
	}
	a.names = append(a.names, in.Name)
	a.samples += s.u.NumSamples
	a.sumF += s.wf
	a.sumI += s.wi
	if e.cfg.Strategy == DPFedAvg {
		a.sumC += s.wf
	}
	return nil
}

// Inputs returns the names of the updates added so far, in the order they
// were added, so the server can check they are exactly the round's chosen
// updates before writing the result.
func (a *Accumulator) Inputs() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.names)
}

// Len returns the number of updates added.
func (a *Accumulator) Len() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.names)
}

// NumSamples returns the sum of the num_samples of the updates added.
func (a *Accumulator) NumSamples() int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.samples
}

// WriteAggregate writes the aggregate of the updates added so far to out,
// streaming it through a weights encoder, and returns the summary. The
// server optimizers read their state given with WithState and write the new
// one to WithStateOut's writer (at every call). It does not change the sum:
// it can be called again, after more Adds or to retry a failed write. An
// error can come after part of the aggregate was written to out.
func (a *Accumulator) WriteAggregate(ctx context.Context, out io.Writer) (*Result, error) {
	t0 := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.broken != nil {
		return nil, a.broken
	}
	if len(a.names) == 0 {
		return nil, errNoUpdates
	}
	e := a.e
	stateRound, err := e.openState(ctx)
	if err != nil {
		return nil, err
	}
	o, err := e.newOutput(out, a.samples, stateRound)
	if err != nil {
		return nil, err
	}
	e.divide = true
	e.sumF, e.sumI, e.sumC, e.k = a.sumF, a.sumI, a.sumC, len(a.names)
	err = e.run(ctx, e.o.block, func(w *worker, start int64, n int) error {
		w.segs = e.l.segments(w.segs, start, n)
		v := grow(&w.acc, n)
		copy(v, a.acc[start:start+int64(n)])
		_, err := e.finish(w, start, n, v)
		return err
	}, o.emit)
	if err == nil {
		err = o.close()
	}
	if err != nil {
		return nil, err
	}
	res := &Result{
		Strategy: e.cfg.Strategy, Mode: "incremental", Updates: slices.Clone(a.names),
		NumSamples: a.samples, Tensors: len(e.l.tensors), Params: e.l.params(),
		BytesRead: e.read.Load(), BytesWritten: o.cw.n,
		Duration: a.spent + time.Since(t0),
	}
	if e.cfg.KeepsState() {
		res.StateRound = stateRound
	}
	return res, nil
}
