package aggregate

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
)

// Strategy names how a round's updates become the aggregate.
type Strategy string

// The strategies. The package documentation describes each.
const (
	FedAvg           Strategy = "fedavg"
	FedAvgUnweighted Strategy = "fedavg-unweighted"
	Median           Strategy = "median"
	TrimmedMean      Strategy = "trimmed-mean"
	Krum             Strategy = "krum"
	MultiKrum        Strategy = "multi-krum"
	FedAvgM          Strategy = "fedavgm"
	FedAdam          Strategy = "fedadam"
	FedYogi          Strategy = "fedyogi"
	FedAdagrad       Strategy = "fedadagrad"
	DPFedAvg         Strategy = "dp-fedavg"
)

// Option names, as the aggregate command's flags and a branch policy's
// StrategyOptions spell them.
const (
	OptTrim            = "trim"
	OptByzantine       = "byzantine"
	OptSelect          = "select"
	OptServerLR        = "server-lr"
	OptMomentum        = "momentum"
	OptBeta1           = "beta1"
	OptBeta2           = "beta2"
	OptTau             = "tau"
	OptClip            = "clip"
	OptNoiseMultiplier = "noise-multiplier"
	OptSeed            = "seed"
	OptAllowNonFinite  = "allow-non-finite"
)

// StrategyInfo documents one strategy: its name, a paragraph on what it is
// for, and the options it takes with their defaults.
type StrategyInfo struct {
	Name Strategy
	// Doc is one paragraph: what the strategy does, what it is for and how
	// its options act.
	Doc string
	// Options are the option names the strategy takes (besides seed and
	// allow-non-finite, which every strategy accepts).
	Options []string
	// Defaults holds the default of each option, as text.
	Defaults map[string]string
}

var strategyInfos = []StrategyInfo{
	{Name: FedAvg, Doc: `Federated averaging (McMahan et al. 2017): tensor k of the result is
sum(n_i * x_ik) / sum(n_i), where n_i is update i's num_samples. Sums are
taken in float64 and cast back to each tensor's dtype; integer tensors (such
as BatchNorm's num_batches_tracked) are rounded to the nearest integer. The
default. Runs incrementally or blocked.`},
	{Name: FedAvgUnweighted, Doc: `The plain mean of the updates, each counting once
whatever its num_samples: for leaves whose sample counts are not comparable or
not trusted. Runs incrementally or blocked.`},
	{Name: Median, Doc: `Coordinate-wise median (Yin et al. 2018): every parameter
of the result is the median of that parameter over the updates (the mean of
the two middle values for an even count), unweighted. Up to half of the
updates can be arbitrarily wrong without moving the result outside the range
of the honest ones. Needs all updates at once, so it runs blocked only.`},
	{Name: TrimmedMean, Doc: `Coordinate-wise trimmed mean (Yin et al. 2018): for
every parameter, the floor(trim * N) largest and as many smallest values over
the N updates are dropped and the rest averaged, unweighted. --trim BETA, in
[0, 0.5), is the fraction cut at each end (default 0.1); 0 is the unweighted
mean. Robust to up to that fraction of bad updates, smoother than the median.
Blocked only.`, Options: []string{OptTrim}, Defaults: map[string]string{OptTrim: "0.1"}},
	{Name: Krum, Doc: `Krum (Blanchard et al. 2017): picks the one update whose
summed squared distance to its N-F-2 nearest neighbours is smallest and
returns it; its num_samples is the result's. --byzantine F (default 1) is the
number of malicious updates to tolerate; it needs N > 2F+2 updates. Blocked
only.`, Options: []string{OptByzantine}, Defaults: map[string]string{OptByzantine: "1"}},
	{Name: MultiKrum, Doc: `Multi-Krum (El Mhamdi et al. 2018): scores updates as
Krum does, keeps the --select M (default N-F) best and averages them weighted
by num_samples, as fedavg does; the result's num_samples is theirs. It keeps
Krum's protection against --byzantine F (default 1) bad updates while
averaging out more noise. Needs N > 2F+2 and 1 <= M <= N. Blocked only.`,
		Options: []string{OptByzantine, OptSelect}, Defaults: map[string]string{OptByzantine: "1", OptSelect: "0 (N-F)"}},
	{Name: FedAvgM, Doc: `FedAvg with server momentum (Hsu et al. 2019; Reddi et al.
2021): with the previous global model x and the fedavg mean y, the
pseudo-gradient is d = y - x; the server keeps a momentum m = momentum * m + d
and returns x + server-lr * m. Helps with non-IID leaves. Options --server-lr
(default 1) and --momentum (default 0.9). Needs the global model; keeps m in
the state file. Integer tensors are plain fedavg. Runs incrementally or
blocked.`, Options: []string{OptServerLR, OptMomentum}, Defaults: map[string]string{OptServerLR: "1", OptMomentum: "0.9"}},
	{Name: FedAdam, Doc: `FedAdam (Reddi et al. 2021, Adaptive Federated
Optimization): with d as for fedavgm, m = beta1 * m + (1-beta1) * d,
v = beta2 * v + (1-beta2) * d^2, and the result is
x + server-lr * m / (sqrt(v) + tau), without bias correction as in the paper.
Adaptive per-parameter server steps, for heterogeneous leaves and sparse
gradients. Options --server-lr (default 0.1), --beta1 (0.9), --beta2 (0.99),
--tau (1e-9); defaults as in Flower. Needs the global model; keeps m and v in
the state file. Integer tensors are plain fedavg. Incremental or blocked.`,
		Options:  []string{OptServerLR, OptBeta1, OptBeta2, OptTau},
		Defaults: map[string]string{OptServerLR: "0.1", OptBeta1: "0.9", OptBeta2: "0.99", OptTau: "1e-09"}},
	{Name: FedYogi, Doc: `FedYogi (Reddi et al. 2021): as fedadam, but
v = v - (1-beta2) * d^2 * sign(v - d^2), which grows v more slowly and makes
the step less sensitive to its start. Options --server-lr (default 0.01),
--beta1 (0.9), --beta2 (0.99), --tau (1e-3); defaults as in Flower. Needs the
global model; keeps m and v in the state file. Incremental or blocked.`,
		Options:  []string{OptServerLR, OptBeta1, OptBeta2, OptTau},
		Defaults: map[string]string{OptServerLR: "0.01", OptBeta1: "0.9", OptBeta2: "0.99", OptTau: "0.001"}},
	{Name: FedAdagrad, Doc: `FedAdagrad (Reddi et al. 2021): as fedadam, but
v = v + d^2, so steps shrink for parameters that have moved a lot. Options
--server-lr (default 0.1), --beta1 (default 0, no momentum, as in Flower),
--tau (1e-9). Needs the global model; keeps m and v in the state file.
Incremental or blocked.`, Options: []string{OptServerLR, OptBeta1, OptTau},
		Defaults: map[string]string{OptServerLR: "0.1", OptBeta1: "0", OptTau: "1e-09"}},
	{Name: DPFedAvg, Doc: `Central differential privacy, DP-FedAvg (McMahan et al.
2018): each update's delta to the global model, over all its float tensors,
is clipped to L2 norm --clip C, the clipped deltas are averaged unweighted
(each of the K updates counts once, so one leaf moves the mean by at most
C/K), and Gaussian noise of standard deviation --noise-multiplier Z times C/K
is added to every float parameter; the result is the global model plus that.
--seed S fixes the noise. Privacy accounting (epsilon over rounds) is left to
the operator. Integer tensors are plain fedavg, without noise. Needs the
global model. Incremental or blocked.`, Options: []string{OptClip, OptNoiseMultiplier},
		Defaults: map[string]string{OptClip: "(required)", OptNoiseMultiplier: "(required)"}},
}

// Strategies returns every strategy's documentation, in a stable order,
// each Doc one line for the caller to wrap.
func Strategies() []StrategyInfo {
	out := make([]StrategyInfo, len(strategyInfos))
	copy(out, strategyInfos)
	for i := range out {
		out[i].Doc = strings.Join(strings.Fields(out[i].Doc), " ")
	}
	return out
}

func infoOf(s Strategy) (StrategyInfo, bool) {
	for _, si := range strategyInfos {
		if si.Name == s {
			return si, true
		}
	}
	return StrategyInfo{}, false
}

// Config is a validated strategy with its parameters. Build one with
// ParseConfig, or fill it in and call Validate.
type Config struct {
	Strategy Strategy
	// Trim is trimmed-mean's fraction cut at each end, in [0, 0.5).
	Trim float64
	// Byzantine is the number of bad updates Krum and Multi-Krum tolerate.
	Byzantine int
	// Select is how many updates Multi-Krum averages; 0 means N-Byzantine.
	Select int
	// ServerLR, Momentum, Beta1, Beta2 and Tau are the server optimizers'
	// parameters (fedavgm, fedadam, fedyogi, fedadagrad).
	ServerLR, Momentum, Beta1, Beta2, Tau float64
	// Clip is dp-fedavg's L2 bound on each update's delta.
	Clip float64
	// NoiseMultiplier is dp-fedavg's noise standard deviation in units of
	// Clip/K.
	NoiseMultiplier float64
	// Seed fixes dp-fedavg's noise.
	Seed int64
	// AllowNonFinite accepts updates that hold NaN or Inf; by default they
	// are refused with ErrNonFinite.
	AllowNonFinite bool
}

// ParseConfig builds the Config of a strategy from its options, keyed by the
// aggregate command's flag names without dashes ("trim", "byzantine",
// "server-lr", ...). An empty strategy is fedavg. Options the strategy does
// not take are refused, so a misspelt policy fails when it is set, not when a
// round aggregates. "seed" and "allow-non-finite" are accepted by every
// strategy. Errors are *ConfigError.
func ParseConfig(strategy string, opts map[string]string) (Config, error) {
	s := Strategy(strategy)
	if s == "" {
		s = FedAvg
	}
	info, ok := infoOf(s)
	if !ok {
		names := make([]string, len(strategyInfos))
		for i, si := range strategyInfos {
			names[i] = string(si.Name)
		}
		return Config{}, &ConfigError{Strategy: strategy, Msg: fmt.Sprintf("unknown strategy %q; one of %s", strategy, strings.Join(names, ", "))}
	}
	c := defaults(s)
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := strings.TrimSpace(opts[k])
		if k != OptSeed && k != OptAllowNonFinite && !slices.Contains(info.Options, k) {
			takes := "takes no options"
			if len(info.Options) > 0 {
				takes = "takes --" + strings.Join(info.Options, ", --")
			}
			return Config{}, &ConfigError{Strategy: strategy, Option: k, Msg: fmt.Sprintf("unknown option --%s; %s %s", k, s, takes)}
		}
		var err error
		switch k {
		case OptTrim:
			c.Trim, err = parseFloat(v)
		case OptByzantine:
			c.Byzantine, err = strconv.Atoi(v)
		case OptSelect:
			c.Select, err = strconv.Atoi(v)
		case OptServerLR:
			c.ServerLR, err = parseFloat(v)
		case OptMomentum:
			c.Momentum, err = parseFloat(v)
		case OptBeta1:
			c.Beta1, err = parseFloat(v)
		case OptBeta2:
			c.Beta2, err = parseFloat(v)
		case OptTau:
			c.Tau, err = parseFloat(v)
		case OptClip:
			c.Clip, err = parseFloat(v)
		case OptNoiseMultiplier:
			c.NoiseMultiplier, err = parseFloat(v)
		case OptSeed:
			c.Seed, err = strconv.ParseInt(v, 10, 64)
		case OptAllowNonFinite:
			c.AllowNonFinite, err = strconv.ParseBool(v)
		}
		if err != nil {
			return Config{}, &ConfigError{Strategy: strategy, Option: k, Msg: fmt.Sprintf("--%s: cannot parse %q", k, opts[k])}
		}
	}
	if s == DPFedAvg {
		for _, k := range []string{OptClip, OptNoiseMultiplier} {
			if _, ok := opts[k]; !ok {
				return Config{}, &ConfigError{Strategy: strategy, Option: k, Msg: fmt.Sprintf("--%s is required", k)}
			}
		}
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

func parseFloat(s string) (float64, error) {
	v, err := strconv.ParseFloat(s, 64)
	if err == nil && (math.IsNaN(v) || math.IsInf(v, 0)) {
		return 0, fmt.Errorf("not finite")
	}
	return v, err
}

// defaults returns the Config of s with every option at its default.
func defaults(s Strategy) Config {
	c := Config{Strategy: s}
	switch s {
	case TrimmedMean:
		c.Trim = 0.1
	case Krum, MultiKrum:
		c.Byzantine = 1
	case FedAvgM:
		c.ServerLR, c.Momentum = 1, 0.9
	case FedAdam:
		c.ServerLR, c.Beta1, c.Beta2, c.Tau = 0.1, 0.9, 0.99, 1e-9
	case FedYogi:
		c.ServerLR, c.Beta1, c.Beta2, c.Tau = 0.01, 0.9, 0.99, 1e-3
	case FedAdagrad:
		c.ServerLR, c.Beta1, c.Tau = 0.1, 0, 1e-9
	}
	return c
}

// Validate checks the parameters of c's strategy. Errors are *ConfigError.
func (c Config) Validate() error {
	bad := func(opt, format string, args ...any) error {
		return &ConfigError{Strategy: string(c.Strategy), Option: opt, Msg: fmt.Sprintf("--"+opt+" "+format, args...)}
	}
	if _, ok := infoOf(c.Strategy); !ok {
		return &ConfigError{Strategy: string(c.Strategy), Msg: fmt.Sprintf("unknown strategy %q", c.Strategy)}
	}
	switch c.Strategy {
	case TrimmedMean:
		if !(c.Trim >= 0 && c.Trim < 0.5) {
			return bad(OptTrim, "must be in [0, 0.5), got %v", c.Trim)
		}
	case Krum, MultiKrum:
		if c.Byzantine < 0 {
			return bad(OptByzantine, "must be at least 0, got %d", c.Byzantine)
		}
		if c.Select < 0 {
			return bad(OptSelect, "must be at least 1 (or 0 for N-F), got %d", c.Select)
		}
	case FedAvgM, FedAdam, FedYogi, FedAdagrad:
		if !(c.ServerLR > 0) {
			return bad(OptServerLR, "must be positive, got %v", c.ServerLR)
		}
		if !(c.Momentum >= 0 && c.Momentum < 1) {
			return bad(OptMomentum, "must be in [0, 1), got %v", c.Momentum)
		}
		if !(c.Beta1 >= 0 && c.Beta1 < 1) {
			return bad(OptBeta1, "must be in [0, 1), got %v", c.Beta1)
		}
		if c.Strategy != FedAdagrad && c.Strategy != FedAvgM && !(c.Beta2 >= 0 && c.Beta2 < 1) {
			return bad(OptBeta2, "must be in [0, 1), got %v", c.Beta2)
		}
		if c.Strategy != FedAvgM && !(c.Tau > 0) {
			return bad(OptTau, "must be positive, got %v", c.Tau)
		}
	case DPFedAvg:
		if !(c.Clip > 0) || math.IsInf(c.Clip, 0) {
			return bad(OptClip, "must be positive, got %v", c.Clip)
		}
		if !(c.NoiseMultiplier >= 0) || math.IsInf(c.NoiseMultiplier, 0) {
			return bad(OptNoiseMultiplier, "must be at least 0, got %v", c.NoiseMultiplier)
		}
	}
	return nil
}

// Options returns c's strategy options as ParseConfig reads them, every
// option the strategy takes included, so that
// ParseConfig(string(c.Strategy), c.Options()) gives c back.
func (c Config) Options() map[string]string {
	f := func(v float64) string { return strconv.FormatFloat(v, 'g', -1, 64) }
	m := map[string]string{}
	info, _ := infoOf(c.Strategy)
	for _, k := range info.Options {
		switch k {
		case OptTrim:
			m[k] = f(c.Trim)
		case OptByzantine:
			m[k] = strconv.Itoa(c.Byzantine)
		case OptSelect:
			m[k] = strconv.Itoa(c.Select)
		case OptServerLR:
			m[k] = f(c.ServerLR)
		case OptMomentum:
			m[k] = f(c.Momentum)
		case OptBeta1:
			m[k] = f(c.Beta1)
		case OptBeta2:
			m[k] = f(c.Beta2)
		case OptTau:
			m[k] = f(c.Tau)
		case OptClip:
			m[k] = f(c.Clip)
		case OptNoiseMultiplier:
			m[k] = f(c.NoiseMultiplier)
		}
	}
	if c.Seed != 0 {
		m[OptSeed] = strconv.FormatInt(c.Seed, 10)
	}
	if c.AllowNonFinite {
		m[OptAllowNonFinite] = "true"
	}
	return m
}

// NeedsAll reports whether the strategy needs every update at once (median,
// trimmed-mean, krum, multi-krum), so that it runs only through Aggregate,
// not through an Accumulator.
func (c Config) NeedsAll() bool {
	switch c.Strategy {
	case Median, TrimmedMean, Krum, MultiKrum:
		return true
	}
	return false
}

// NeedsGlobal reports whether the strategy needs the previous global model
// (the server optimizers and dp-fedavg).
func (c Config) NeedsGlobal() bool {
	return c.Strategy.serverOpt() || c.Strategy == DPFedAvg
}

// KeepsState reports whether the strategy carries state from round to round
// (the server optimizers), read with WithState and written with
// WithStateOut.
func (c Config) KeepsState() bool { return c.Strategy.serverOpt() }

func (s Strategy) serverOpt() bool {
	switch s {
	case FedAvgM, FedAdam, FedYogi, FedAdagrad:
		return true
	}
	return false
}

// slots is the number of state values kept per parameter.
func (s Strategy) slots() int {
	switch s {
	case FedAvgM:
		return 1
	case FedAdam, FedYogi, FedAdagrad:
		return 2
	}
	return 0
}
