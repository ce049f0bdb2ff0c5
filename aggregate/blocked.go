package aggregate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"
	"time"
)

// Aggregate combines the updates in inputs with cfg's strategy and writes
// the result to out as a weights file in the updates' format. It walks the
// parameters in blocks: each worker (one per core by default) reads a block
// from every input with ReadAt and combines it, and blocks are written in
// order, so memory is O(workers x block) for the fedavg family and
// O(workers x updates x block) for the strategies that need all updates,
// never O(model). Every strategy runs this way.
//
// Inputs are sorted by name first, so the result does not depend on their
// order; two inputs of the same name are refused (ErrDuplicate). The first of them (or the global model, when the strategy needs
// one) fixes the tensors' shapes and output dtypes; an input that disagrees
// fails with an *InputError of kind ErrMismatch, and one holding NaN or Inf
// with ErrNonFinite unless cfg.AllowNonFinite. Such an error can come after
// part of the result was written to out: write to a temporary blob and keep
// it only when Aggregate succeeds.
func Aggregate(ctx context.Context, cfg Config, inputs []Input, out io.Writer, opts ...Option) (*Result, error) {
	t0 := time.Now()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if len(inputs) == 0 {
		return nil, &ConfigError{Strategy: string(cfg.Strategy), Msg: "no updates to aggregate"}
	}
	e := &engine{cfg: cfg, o: buildOptions(opts)}
	sorted := slices.Clone(inputs)
	slices.SortStableFunc(sorted, func(a, b Input) int { return cmp.Compare(a.Name, b.Name) })
	for i := 1; i < len(sorted); i++ {
		if sorted[i].Name == sorted[i-1].Name {
			return nil, &InputError{Role: roleUpdate, Input: sorted[i].Name, Tensor: -1, Kind: ErrDuplicate, Msg: "is given twice"}
		}
	}

	if err := e.openAux(ctx); err != nil {
		return nil, err
	}
	srcs, err := openAll(ctx, sorted, max(e.o.workers, 4))
	if err != nil {
		return nil, err
	}
	names := make([]string, len(sorted))
	for i, s := range srcs {
		if e.l == nil {
			e.l = newLayout(s.u, "the first update's")
		}
		if err := e.l.check(s); err != nil {
			return nil, err
		}
		names[i] = s.name
	}
	stateRound, err := e.openState(ctx)
	if err != nil {
		return nil, err
	}
	res := &Result{Strategy: cfg.Strategy, Mode: "blocked", Updates: names, Tensors: len(e.l.tensors), Params: e.l.params()}
	if cfg.KeepsState() {
		res.StateRound = stateRound
	}

	var o *output
	switch cfg.Strategy {
	case Median, TrimmedMean:
		res.NumSamples = numSamples(srcs)
		if o, err = e.newOutput(out, res.NumSamples, stateRound); err != nil {
			return nil, err
		}
		err = e.robust(ctx, srcs, o)
	case Krum, MultiKrum:
		var chosen []*source
		if chosen, err = e.krum(ctx, srcs); err != nil {
			return nil, err
		}
		for _, s := range chosen {
			res.Selected = append(res.Selected, s.name)
			s.wf, s.wi = float64(s.u.NumSamples), float64(s.u.NumSamples)
		}
		res.NumSamples = numSamples(chosen)
		if o, err = e.newOutput(out, res.NumSamples, stateRound); err != nil {
			return nil, err
		}
		err = e.average(ctx, chosen, o)
	case DPFedAvg:
		if err = e.clipWeights(ctx, srcs); err != nil {
			return nil, err
		}
		res.NumSamples = numSamples(srcs)
		if o, err = e.newOutput(out, res.NumSamples, stateRound); err != nil {
			return nil, err
		}
		err = e.average(ctx, srcs, o)
	default: // the fedavg family and the server optimizers
		for _, s := range srcs {
			s.wf, s.wi = float64(s.u.NumSamples), float64(s.u.NumSamples)
			if cfg.Strategy == FedAvgUnweighted {
				s.wf, s.wi = 1, 1
			}
		}
		res.NumSamples = numSamples(srcs)
		if o, err = e.newOutput(out, res.NumSamples, stateRound); err != nil {
			return nil, err
		}
		err = e.average(ctx, srcs, o)
	}
	if err != nil {
		return nil, err
	}
	if err := o.close(); err != nil {
		return nil, err
	}
	res.BytesRead = e.read.Load()
	res.BytesWritten = o.cw.n
	res.Duration = time.Since(t0)
	return res, nil
}

// openAll indexes the inputs, n at a time (indexing is a few small reads
// per input, latency-bound on a blob store), and returns the first error in
// input order.
func openAll(ctx context.Context, inputs []Input, n int) ([]*source, error) {
	srcs := make([]*source, len(inputs))
	errs := make([]error, len(inputs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, n)
	for i, in := range inputs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			srcs[i], errs[i] = open(ctx, in, roleUpdate)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return srcs, nil
}

func numSamples(srcs []*source) int64 {
	var n int64
	for _, s := range srcs {
		n += s.u.NumSamples
	}
	return n
}

// average writes the weighted sum of srcs (weights wf and wi), finished by
// the strategy: divided, moved by the server optimizer, or noised.
func (e *engine) average(ctx context.Context, srcs []*source, o *output) error {
	e.divide = true
	e.sumF, e.sumI, e.k = 0, 0, len(srcs)
	for _, s := range srcs {
		e.sumF += s.wf
		e.sumI += s.wi
	}
	return e.run(ctx, e.o.block, func(w *worker, start int64, n int) error {
		if err := e.fold(w, srcs, start, n); err != nil {
			return err
		}
		finite, err := e.finish(w, start, n, w.acc)
		if err == nil && !finite && !e.cfg.AllowNonFinite {
			err = e.findNonFinite(w, srcs)
		}
		return err
	}, o.emit)
}

// robustBlock returns the block size for strategies holding all N updates'
// values of a block at once.
func (e *engine) robustBlock(n int) int {
	b := robustBlockBytes / (8 * n)
	b = max(blockAlign, b/blockAlign*blockAlign)
	return min(b, e.o.block)
}

// loadAll reads the block of every source into w.vals, source after source
// (n values each), checking finiteness.
func (e *engine) loadAll(w *worker, srcs []*source, start int64, n int) ([]float64, error) {
	w.segs = e.l.segments(w.segs, start, n)
	vals := grow(&w.vals, len(srcs)*n)
	for i, s := range srcs {
		v := vals[i*n : (i+1)*n]
		if err := e.readInto(w, s, v, &w.buf, &w.views); err != nil {
			return nil, err
		}
		if err := e.checkLoaded(w, s, v); err != nil {
			return nil, err
		}
	}
	return vals, nil
}

// robust writes the coordinate-wise median or trimmed mean. Each block's
// values are sorted per parameter by a sorting network applied to whole
// rows (update i's values of the block): every compare-exchange is a
// branch-free min/max over two rows, several times faster than sorting each
// parameter's few values with branches the CPU cannot predict. Row k then
// holds every parameter's k-th smallest value. (A NaN, when allowed, makes
// its parameter's result NaN.)
func (e *engine) robust(ctx context.Context, srcs []*source, o *output) error {
	nsrc := len(srcs)
	trim := 0
	if e.cfg.Strategy == TrimmedMean {
		trim = int(math.Floor(e.cfg.Trim * float64(nsrc)))
	}
	net := sortNetwork(nsrc)
	return e.run(ctx, e.robustBlock(nsrc), func(w *worker, start int64, n int) error {
		vals, err := e.loadAll(w, srcs, start, n)
		if err != nil {
			return err
		}
		row := func(i int) []float64 { return vals[i*n : (i+1)*n] }
		for _, ce := range net {
			a, b := row(ce[0]), row(ce[1])
			b = b[:len(a)]
			for j, x := range a {
				y := b[j]
				a[j], b[j] = min(x, y), max(x, y)
			}
		}
		res := grow(&w.acc, n)
		switch {
		case e.cfg.Strategy == Median && nsrc%2 == 1:
			copy(res, row(nsrc/2))
		case e.cfg.Strategy == Median:
			lo, hi := row(nsrc/2-1), row(nsrc/2)
			for j := range res {
				res[j] = (lo[j] + hi[j]) / 2
			}
		default:
			clear(res)
			for i := trim; i < nsrc-trim; i++ {
				for j, x := range row(i) {
					res[j] += x
				}
			}
			k := float64(nsrc - 2*trim)
			for j := range res {
				res[j] /= k
			}
		}
		_, err = e.finish(w, start, n, res)
		return err
	}, o.emit)
}

// sortNetwork returns the compare-exchanges (i, j), i < j, of Batcher's
// odd-even merge sort for n inputs: applied in order, each putting the
// smaller value at i, they sort any n values. There are O(n log^2 n).
func sortNetwork(n int) [][2]int {
	var net [][2]int
	for p := 1; p < n; p <<= 1 {
		for k := p; k >= 1; k >>= 1 {
			for j := k % p; j <= n-1-k; j += 2 * k {
				for i := 0; i <= min(k-1, n-j-k-1); i++ {
					if (i+j)/(2*p) == (i+j+k)/(2*p) {
						net = append(net, [2]int{i + j, i + j + k})
					}
				}
			}
		}
	}
	return net
}

// krum scores the updates by Krum's rule and returns those chosen: the best
// one for krum, the Select best (default N-F) for multi-krum, in input order.
func (e *engine) krum(ctx context.Context, srcs []*source) ([]*source, error) {
	n, f := len(srcs), e.cfg.Byzantine
	if n <= 2*f+2 {
		return nil, &ConfigError{Strategy: string(e.cfg.Strategy), Option: OptByzantine,
			Msg: fmt.Sprintf("--byzantine %d needs more than 2F+2 = %d updates, got %d", f, 2*f+2, n)}
	}
	m := 1
	if e.cfg.Strategy == MultiKrum {
		m = e.cfg.Select
		if m == 0 {
			m = n - f
		}
		if m > n {
			return nil, &ConfigError{Strategy: string(e.cfg.Strategy), Option: OptSelect,
				Msg: fmt.Sprintf("--select %d is more than the %d updates", m, n)}
		}
	}
	// Pairwise squared distances, summed block by block per worker.
	err := e.run(ctx, e.robustBlock(n), func(w *worker, start int64, bn int) error {
		vals, err := e.loadAll(w, srcs, start, bn)
		if err != nil {
			return err
		}
		d := w.sums
		if d == nil {
			d = make([]float64, n*n)
			w.sums = d
		}
		for a := range n {
			va := vals[a*bn : (a+1)*bn]
			for b := a + 1; b < n; b++ {
				vb := vals[b*bn : (b+1)*bn]
				s := 0.0
				for j, x := range va {
					t := x - vb[j]
					s += t * t
				}
				d[a*n+b] += s
			}
		}
		return nil
	}, nil)
	if err != nil {
		return nil, err
	}
	dist := make([]float64, n*n)
	for _, w := range e.workers {
		for i, v := range w.sums {
			dist[i] += v
		}
	}
	scores := make([]float64, n)
	row := make([]float64, 0, n-1)
	for a := range n {
		row = row[:0]
		for b := range n {
			switch {
			case a < b:
				row = append(row, dist[a*n+b])
			case b < a:
				row = append(row, dist[b*n+a])
			}
		}
		slices.Sort(row)
		for _, v := range row[:n-f-2] {
			scores[a] += v
		}
	}
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	// Stable, so ties go to the first by name.
	slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(scores[a], scores[b]) })
	chosen := order[:m]
	slices.Sort(chosen)
	out := make([]*source, m)
	for i, c := range chosen {
		out[i] = srcs[c]
	}
	return out, nil
}

// clipWeights computes each update's L2 distance to the global model over
// the float tensors and sets its float weight to the clipping factor
// min(1, clip/norm); integer tensors keep num_samples weights. The squares
// are summed per run of blockAlign parameters and the runs in order, so the
// norm, and the result, do not depend on block size, workers or path; that
// keeps N x params / 4096 sums.
func (e *engine) clipWeights(ctx context.Context, srcs []*source) error {
	nruns := int((e.l.params() + blockAlign - 1) / blockAlign)
	runs := make([][]float64, len(srcs))
	for i := range runs {
		runs[i] = make([]float64, nruns)
	}
	err := e.run(ctx, e.o.block, func(w *worker, start int64, bn int) error {
		w.segs = e.l.segments(w.segs, start, bn)
		g := grow(&w.g, bn)
		if err := e.readInto(w, e.global, g, &w.gbuf, &w.gviews); err != nil {
			return err
		}
		if err := e.checkLoaded(w, e.global, g); err != nil {
			return err
		}
		x := grow(&w.tmp, bn)
		for i, s := range srcs {
			if err := e.readInto(w, s, x, &w.buf, &w.views); err != nil {
				return err
			}
			if err := e.checkLoaded(w, s, x); err != nil {
				return err
			}
			// x becomes the squared differences, 0 off the float tensors.
			for _, sg := range w.segs {
				xs := x[sg.pos : sg.pos+sg.n]
				if !e.l.float[sg.k] {
					clear(xs)
					continue
				}
				gs := g[sg.pos : sg.pos+sg.n]
				for j, v := range xs {
					d := v - gs[j]
					xs[j] = d * d
				}
			}
			for c := 0; c < bn; c += blockAlign {
				ss := 0.0
				for _, v := range x[c:min(c+blockAlign, bn)] {
					ss += v
				}
				runs[i][(start+int64(c))/blockAlign] = ss
			}
		}
		return nil
	}, nil)
	if err != nil {
		return err
	}
	e.sumC = 0
	for i, s := range srcs {
		ss := 0.0
		for _, v := range runs[i] {
			ss += v
		}
		s.wf, s.wi = clipFactor(math.Sqrt(ss), e.cfg.Clip), float64(s.u.NumSamples)
		e.sumC += s.wf
	}
	return nil
}

// clipFactor is what scales a delta of L2 norm norm to at most clip.
func clipFactor(norm, clip float64) float64 {
	if norm <= clip || norm == 0 {
		return 1
	}
	if math.IsInf(norm, 0) || math.IsNaN(norm) {
		return 0
	}
	return clip / norm
}

// errNoUpdates is returned when asked for a result with nothing added.
var errNoUpdates = errors.New("aggregate: no updates added")
