package aggregate

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/branchkey/branchkey/weights"
)

// DefaultBlockSize is the number of parameters a worker combines at once
// when nothing else is asked: 64Ki parameters keep a worker's sums (512 KiB)
// and read buffer in its core's L2 cache. On the benchmark machine 64Ki and
// 256Ki measured alike and 1Mi a third slower; smaller blocks cost more
// read calls.
const DefaultBlockSize = 64 << 10

// blockAlign is what block sizes are rounded to; it is also the length of
// the runs of dp-fedavg noise drawn from one seeded generator, so that the
// noise does not depend on the block size or the number of workers.
const blockAlign = 4096

// robustBlockBytes bounds a worker's values of all updates for one block in
// the strategies that need them all (N x block x 8 bytes), so that they stay
// in L2 cache while the sorting network passes over them; the block does not
// shrink below blockAlign parameters, though.
const robustBlockBytes = 512 << 10

// Option changes how Aggregate or an Accumulator runs.
type Option func(*options)

type options struct {
	global   *Input
	state    *Input
	stateOut io.Writer
	workers  int
	block    int
}

// WithGlobal gives the previous global model, which the server optimizers
// and dp-fedavg need. Other strategies ignore it.
func WithGlobal(in Input) Option { return func(o *options) { o.global = &in } }

// WithState gives a server optimizer's state from the previous round, as
// WithStateOut wrote it. Without it the state starts at zero (the first
// round). Strategies without state ignore it.
func WithState(in Input) Option { return func(o *options) { o.state = &in } }

// WithStateOut makes a server optimizer write its state after this round to
// w, for WithState next round. The state is a weights file: its num_samples
// counts the rounds it has seen, and tensor k holds, as float64, the
// optimizer's values for the model's tensor k interleaved per parameter
// (fedavgm: the momentum; fedadam, fedyogi and fedadagrad: m then v), with
// shape shape_k + (slots,) for a C-order tensor and (slots,) + shape_k in
// Fortran order otherwise. Strategies without state write nothing.
func WithStateOut(w io.Writer) Option { return func(o *options) { o.stateOut = w } }

// WithWorkers sets the number of goroutines that combine blocks; the
// default is runtime.GOMAXPROCS(0).
func WithWorkers(n int) Option { return func(o *options) { o.workers = n } }

// WithBlockSize sets the number of parameters combined at once, rounded up
// to a multiple of 4096; the default is DefaultBlockSize. Memory grows with
// it: about workers x block x (12 + bytes per element) for fedavg, workers x
// updates x block x 8 for the strategies that need all updates.
func WithBlockSize(n int) Option { return func(o *options) { o.block = n } }

func buildOptions(opts []Option) options {
	var o options
	for _, f := range opts {
		f(&o)
	}
	if o.workers <= 0 {
		o.workers = runtime.GOMAXPROCS(0)
	}
	if o.block <= 0 {
		o.block = DefaultBlockSize
	}
	o.block = (o.block + blockAlign - 1) / blockAlign * blockAlign
	return o
}

// Result summarizes an aggregation.
type Result struct {
	Strategy Strategy
	// Mode is "blocked" (Aggregate) or "incremental" (Accumulator).
	Mode string
	// Updates names the updates aggregated, in the order they were
	// combined (Aggregate sorts them by name).
	Updates []string
	// Selected names the updates Krum or Multi-Krum chose; nil for other
	// strategies, whose result depends on all of Updates.
	Selected []string
	// NumSamples is the result's num_samples: the sum of the num_samples of
	// the updates it stands for (Selected for Krum and Multi-Krum).
	NumSamples int64
	// Tensors and Params describe the model.
	Tensors int
	Params  int64
	// BytesRead counts the bytes read from all inputs, the global model and
	// the state included (for an Accumulator, by all its Adds and writes);
	// BytesWritten counts the aggregate's bytes.
	BytesRead    int64
	BytesWritten int64
	// StateRound is the number of rounds the optimizer state has seen after
	// this one, for the strategies that keep state; else 0.
	StateRound int64
	// Duration is the wall time of the aggregation (for an Accumulator, of
	// its Adds and WriteAggregate).
	Duration time.Duration
}

// GBps returns the input bytes read per second, in 10^9 bytes.
func (r *Result) GBps() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.BytesRead) / r.Duration.Seconds() / 1e9
}

// engine holds what a pass over the coordinate space needs.
type engine struct {
	cfg     Config
	o       options
	l       *layout
	global  *source
	state   *source
	read    atomic.Int64
	workers []*worker // of the last run

	// How finish turns sums into values: float coordinates are divided by
	// sumF, integer ones by sumI. dp-fedavg uses k and sumC instead.
	sumF, sumI float64
	k          int
	sumC       float64
	divide     bool // false when the values are already final (robust strategies)
}

// worker is one goroutine's scratch, reused block after block.
type worker struct {
	id     int
	segs   []seg
	buf    []byte
	views  [][]byte
	gbuf   []byte
	gviews [][]byte
	sbuf   []byte
	sviews [][]byte
	tmp    []float64
	acc    []float64
	g      []float64
	st     []float64
	vals   []float64
	noise  []float64
	out    []byte
	sout   []byte
	// per-run reductions
	sums []float64
}

func grow[T any](s *[]T, n int) []T {
	if cap(*s) < n {
		*s = make([]T, n)
	}
	*s = (*s)[:n]
	return *s
}

// run calls work for every block of the coordinate space on the workers,
// worker w taking blocks w, w+W, ...; when emit is set, it is called after
// each block's work in block order, so that output is written in order while
// the next blocks are being combined.
func (e *engine) run(ctx context.Context, block int, work func(w *worker, start int64, n int) error, emit func(w *worker) error) error {
	total := e.l.params()
	nb := int((total + int64(block) - 1) / int64(block))
	nw := max(1, min(e.o.workers, nb))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		cancel()
	}
	turn := make([]chan struct{}, nw)
	for i := range turn {
		turn[i] = make(chan struct{}, 1)
	}
	turn[0] <- struct{}{}
	e.workers = make([]*worker, nw)
	for i := range nw {
		w := &worker{id: i}
		e.workers[i] = w
		wg.Go(func() {
			for b := i; b < nb; b += nw {
				if err := ctx.Err(); err != nil {
					fail(err)
					return
				}
				start := int64(b) * int64(block)
				n := int(min(int64(block), total-start))
				if err := work(w, start, n); err != nil {
					fail(err)
					return
				}
				if emit == nil {
					continue
				}
				select {
				case <-turn[i]:
				case <-ctx.Done():
					fail(ctx.Err())
					return
				}
				if err := emit(w); err != nil {
					fail(err)
					return
				}
				turn[(i+1)%nw] <- struct{}{}
			}
		})
	}
	wg.Wait()
	return firstErr
}

// readInto reads the block's segments of s and converts them into dst
// (len n * s.slots).
func (e *engine) readInto(w *worker, s *source, dst []float64, buf *[]byte, views *[][]byte) error {
	nr, err := s.read(w.segs, buf, views)
	e.read.Add(nr)
	if err != nil {
		return err
	}
	for i, sg := range w.segs {
		load(dst[sg.pos*s.slots:(sg.pos+sg.n)*s.slots], (*views)[i], s.u.Tensors[sg.k].DType)
	}
	return nil
}

// fold adds the block of every source, weighted, into w.acc, source after
// source: with the block's sums in cache, one streaming pass per source is
// faster than fusing sources (measured), and the order of the additions is
// the sources' order, as in numpy's one-at-a-time loop.
func (e *engine) fold(w *worker, srcs []*source, start int64, n int) error {
	w.segs = e.l.segments(w.segs, start, n)
	acc := grow(&w.acc, n)
	clear(acc)
	tmp := grow(&w.tmp, n)
	for _, s := range srcs {
		nr, err := s.read(w.segs, &w.buf, &w.views)
		e.read.Add(nr)
		if err != nil {
			return err
		}
		for i, sg := range w.segs {
			wt := s.wf
			if !e.l.float[sg.k] {
				wt = s.wi
			}
			addScaled(acc[sg.pos:sg.pos+sg.n], w.views[i], s.u.Tensors[sg.k].DType, wt, tmp)
		}
	}
	return nil
}

// findNonFinite returns the ErrNonFinite InputError for the first NaN or Inf
// in the block of any of srcs, or nil: a sum that is not finite can also
// come from an overflow of finite float64 inputs.
func (e *engine) findNonFinite(w *worker, srcs []*source) error {
	for _, s := range srcs {
		if err := e.checkFinite(w, s); err != nil {
			return err
		}
	}
	return nil
}

// checkFinite reads the block's segments of s and returns an ErrNonFinite
// InputError for the first NaN or Inf.
func (e *engine) checkFinite(w *worker, s *source) error {
	nr, err := s.read(w.segs, &w.buf, &w.views)
	e.read.Add(nr)
	if err != nil {
		return err
	}
	for i, sg := range w.segs {
		dt := s.u.Tensors[sg.k].DType
		if j := dt.NonFinite(w.views[i]); j >= 0 {
			var v [1]float64
			dt.ToFloat64(v[:], w.views[i][j*dt.Size:])
			return nonFinite(s, sg.k, sg.off+int64(j), v[0])
		}
	}
	return nil
}

func nonFinite(s *source, k int, elem int64, v float64) error {
	return &InputError{Role: s.role, Input: s.name, Tensor: k, Kind: ErrNonFinite,
		Msg: fmt.Sprintf("tensor %d holds %v at flat index %d (NaN and Inf are refused)", k, v, elem)}
}

// checkLoaded returns an ErrNonFinite InputError for the first NaN or Inf
// in vals, the block's values of s, if non-finite values are refused.
func (e *engine) checkLoaded(w *worker, s *source, vals []float64) error {
	if e.cfg.AllowNonFinite || allFinite(vals) {
		return nil
	}
	for _, sg := range w.segs {
		v := vals[sg.pos*s.slots : (sg.pos+sg.n)*s.slots]
		if j := firstNonFinite(v); j >= 0 {
			return nonFinite(s, sg.k, sg.off+int64(j/s.slots), v[j])
		}
	}
	return nil
}

// finish turns the block's combined values in vals (sums, or final values
// when !e.divide) into the output bytes w.out and, for the server
// optimizers, the state bytes w.sout. It reports whether every output
// value is finite, so that the caller can look for the input to blame.
func (e *engine) finish(w *worker, start int64, n int, vals []float64) (bool, error) {
	cfg := &e.cfg
	var g []float64
	if e.global != nil {
		g = grow(&w.g, n)
		if err := e.readInto(w, e.global, g, &w.gbuf, &w.gviews); err != nil {
			return false, err
		}
		if err := e.checkLoaded(w, e.global, g); err != nil {
			return false, err
		}
	}
	var noise []float64
	if cfg.Strategy == DPFedAvg && cfg.NoiseMultiplier > 0 {
		noise = grow(&w.noise, n)
		gaussian(noise, start, cfg.Seed)
	}
	slots := cfg.Strategy.slots()
	var st []float64
	if slots > 0 {
		st = grow(&w.st, n*slots)
		if e.state != nil {
			if err := e.readInto(w, e.state, st, &w.sbuf, &w.sviews); err != nil {
				return false, err
			}
			if err := e.checkLoaded(w, e.state, st); err != nil {
				return false, err
			}
		} else {
			clear(st)
		}
	}
	size := 0
	for _, sg := range w.segs {
		size += sg.n * e.l.tensors[sg.k].DType.Size
	}
	out := grow(&w.out, size)
	o := 0
	finite := true
	for _, sg := range w.segs {
		v := vals[sg.pos : sg.pos+sg.n]
		dt := e.l.tensors[sg.k].DType
		dst := out[o : o+sg.n*dt.Size]
		o += len(dst)
		float := e.l.float[sg.k]
		switch {
		case !e.divide:
		case !float:
			for j := range v {
				v[j] /= e.sumI
			}
		case cfg.Strategy == DPFedAvg:
			// The mean of the clipped updates g + c_i (x_i - g) is
			// (sum c_i x_i + (K - sum c_i) g) / K.
			k := float64(e.k)
			rest := k - e.sumC
			gs := g[sg.pos : sg.pos+sg.n]
			sigma := cfg.NoiseMultiplier * cfg.Clip / k
			for j := range v {
				v[j] = (v[j] + rest*gs[j]) / k
			}
			if noise != nil {
				ns := noise[sg.pos : sg.pos+sg.n]
				for j := range v {
					v[j] += sigma * ns[j]
				}
			}
		case slots > 0:
			for j := range v {
				v[j] /= e.sumF
			}
			e.serverStep(v, g[sg.pos:sg.pos+sg.n], st[sg.pos*slots:(sg.pos+sg.n)*slots])
		case dt == weights.Float32:
			// The common case in one pass.
			finite = divideToF32(dst, v, e.sumF) && finite
			continue
		default:
			for j := range v {
				v[j] /= e.sumF
			}
		}
		if float && finite && !allFinite(v) {
			finite = false
		}
		dt.FromFloat64(dst, v)
	}
	if slots > 0 {
		sout := grow(&w.sout, n*slots*8)
		weights.Float64.FromFloat64(sout, st)
	}
	return finite, nil
}

// serverStep applies the server optimizer to one tensor piece: y holds the
// fedavg means and becomes the new model, x is the global model, st the
// state (slots values per parameter), updated in place.
func (e *engine) serverStep(y, x, st []float64) {
	c := &e.cfg
	lr := c.ServerLR
	switch c.Strategy {
	case FedAvgM:
		for j := range y {
			d := y[j] - x[j]
			m := c.Momentum*st[j] + d
			st[j] = m
			y[j] = x[j] + lr*m
		}
	case FedAdam, FedYogi, FedAdagrad:
		b1, b2, tau := c.Beta1, c.Beta2, c.Tau
		for j := range y {
			d := y[j] - x[j]
			m := b1*st[2*j] + (1-b1)*d
			v := st[2*j+1]
			d2 := d * d
			switch c.Strategy {
			case FedAdam:
				v = b2*v + (1-b2)*d2
			case FedYogi:
				v -= (1 - b2) * d2 * sign(v-d2)
			case FedAdagrad:
				v += d2
			}
			st[2*j], st[2*j+1] = m, v
			y[j] = x[j] + lr*m/(math.Sqrt(v)+tau)
		}
	}
}

func sign(x float64) float64 {
	switch {
	case x > 0:
		return 1
	case x < 0:
		return -1
	}
	return 0
}

// gaussian fills dst with the standard normal draws of coordinates
// [start, start+len(dst)). Each run of blockAlign coordinates has its own
// generator seeded by (seed, run), so a coordinate's draw does not depend on
// how the space is cut into blocks.
func gaussian(dst []float64, start int64, seed int64) {
	for i := 0; i < len(dst); {
		c := (start + int64(i)) / blockAlign
		r := rand.New(rand.NewPCG(uint64(seed), uint64(c)^0x6470_6e6f_6973_6521)) // "dpnoise!"
		for skip := start + int64(i) - c*blockAlign; skip > 0; skip-- {
			r.NormFloat64()
		}
		end := min(len(dst), int((c+1)*blockAlign-start))
		for ; i < end; i++ {
			dst[i] = r.NormFloat64()
		}
	}
}

// countWriter counts the bytes written through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// output is the aggregate's encoder and, for server optimizers, the state's.
type output struct {
	enc, senc *weights.Encoder
	cw, scw   *countWriter
}

func (e *engine) newOutput(out io.Writer, numSamples, stateRound int64) (*output, error) {
	o := &output{cw: &countWriter{w: out}}
	var err error
	if o.enc, err = weights.NewEncoder(o.cw, numSamples, e.l.tensors); err != nil {
		return nil, fmt.Errorf("aggregate: write: %w", err)
	}
	if slots := e.cfg.Strategy.slots(); slots > 0 && e.o.stateOut != nil {
		o.scw = &countWriter{w: e.o.stateOut}
		if o.senc, err = weights.NewEncoder(o.scw, stateRound, e.l.stateTensors(slots)); err != nil {
			return nil, fmt.Errorf("aggregate: write state: %w", err)
		}
	}
	return o, nil
}

// emit writes a worker's finished block.
func (o *output) emit(w *worker) error {
	if _, err := o.enc.Write(w.out); err != nil {
		return fmt.Errorf("aggregate: write: %w", err)
	}
	if o.senc != nil {
		if _, err := o.senc.Write(w.sout); err != nil {
			return fmt.Errorf("aggregate: write state: %w", err)
		}
	}
	return nil
}

func (o *output) close() error {
	if err := o.enc.Close(); err != nil {
		return fmt.Errorf("aggregate: write: %w", err)
	}
	if o.senc != nil {
		if err := o.senc.Close(); err != nil {
			return fmt.Errorf("aggregate: write state: %w", err)
		}
	}
	return nil
}

// openAux opens the global model and the state, as the strategy needs them,
// and makes the layout the global model's when there is one.
func (e *engine) openAux(ctx context.Context) error {
	if e.cfg.NeedsGlobal() {
		if e.o.global == nil {
			return &ConfigError{Strategy: string(e.cfg.Strategy), Msg: "needs the previous global model (--global)"}
		}
		g, err := open(ctx, *e.o.global, roleGlobal)
		if err != nil {
			return err
		}
		e.global = g
		e.l = newLayout(g.u, "the global model's")
	}
	return nil
}

// openState opens the optimizer state, if any, once the layout is known.
func (e *engine) openState(ctx context.Context) (round int64, err error) {
	slots := e.cfg.Strategy.slots()
	if slots == 0 || e.o.state == nil {
		return 1, nil
	}
	s, err := open(ctx, *e.o.state, roleState)
	if err != nil {
		return 0, err
	}
	s.slots = slots
	if err := e.l.checkState(s, slots); err != nil {
		return 0, err
	}
	e.state = s
	return s.u.NumSamples + 1, nil
}
