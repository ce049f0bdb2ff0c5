// Package aggregate is branchkey's aggregation engine: it combines a round's
// updates (weights files, see package weights) into the next global model,
// with bounded memory, near the speed at which the bytes can be read.
//
// # Two ways to feed it
//
// An Accumulator folds updates into a running float64 sum one at a time, as
// they arrive: memory is one accumulator whatever the number of updates.
// The server uses it per upload on one node. It serves the strategies a
// running sum suffices for: fedavg, fedavg-unweighted, the server
// optimizers and dp-fedavg.
//
// Aggregate reads the updates from their files (any io.ReaderAt: a file, a
// blob-store object) and walks the parameters in blocks: each worker, one
// per core, reads a block from every update with ReadAt into buffers it
// reuses, combines it and hands it to the writer, which writes blocks in
// order through a streaming weights.Encoder. Memory is O(workers x updates x
// block), never O(model). Every strategy runs this way; median,
// trimmed-mean, krum and multi-krum run only this way (Config.NeedsAll).
//
// Both accumulate in float64 and cast back to each tensor's dtype (float16
// and bfloat16 included); integer tensors (BatchNorm's num_batches_tracked)
// are averaged and rounded to the nearest integer, never truncated. Inputs
// that disagree with the first one (or with the global model) in tensor
// count, a shape, a dtype kind (float against integer) or a multi-dimensional
// tensor's memory order fail with an *InputError (ErrMismatch) naming the
// input, the tensor and both sides; NaN or Inf is refused (ErrNonFinite)
// unless Config.AllowNonFinite. The result's dtypes are the first input's
// (the global model's when there is one).
//
// # Strategies
//
// A strategy and its options come from ParseConfig, whose option names are
// the aggregate command's flags: branchkey aggregate --strategy trimmed-mean
// --trim 0.2 is ParseConfig("trimmed-mean", {"trim": "0.2"}). Every strategy
// also takes seed and allow-non-finite. n_i is update i's num_samples.
//
// fedavg: federated averaging (McMahan et al. 2017): tensor k of the result
// is sum(n_i * x_ik) / sum(n_i), and its num_samples is sum(n_i). The
// default; incremental or blocked.
//
// fedavg-unweighted: the plain mean, each update counting once whatever its
// num_samples, for leaves whose sample counts are not comparable or not
// trusted. Incremental or blocked.
//
// median: the coordinate-wise median (Yin et al. 2018), unweighted; the mean
// of the two middle values for an even count. Up to half of the updates can
// be arbitrarily wrong without pulling the result outside the range of the
// honest ones. Blocked only.
//
// trimmed-mean: the coordinate-wise trimmed mean (Yin et al. 2018): per
// parameter, the floor(trim * N) largest and as many smallest of the N values
// are dropped and the rest averaged, unweighted. Option trim in [0, 0.5),
// default 0.1. Robust to that fraction of bad updates and smoother than the
// median. Blocked only.
//
// krum: Krum (Blanchard et al. 2017) returns the one update whose summed
// squared distance to its N-F-2 nearest neighbours is smallest, with that
// update's num_samples; it tolerates byzantine F (default 1) malicious
// updates and needs N > 2F+2. Blocked only (a first pass computes the
// pairwise distances, a second writes the chosen update).
//
// multi-krum: Multi-Krum (El Mhamdi et al. 2018) scores updates as Krum,
// keeps the select M best (default N-F) and averages them weighted by
// num_samples; the result's num_samples is theirs. Options byzantine F
// (default 1) and select M. Blocked only.
//
// fedavgm: FedAvg with server momentum (Hsu et al. 2019; Reddi et al. 2021).
// With the global model x and the fedavg mean y, the pseudo-gradient
// d = y - x feeds a momentum m = momentum * m + d and the result is
// x + server-lr * m. Options server-lr (default 1) and momentum (0.9). Helps
// with non-IID leaves.
//
// fedadam: FedAdam (Reddi et al. 2021, Adaptive Federated Optimization):
// m = beta1 * m + (1-beta1) * d, v = beta2 * v + (1-beta2) * d^2, result
// x + server-lr * m / (sqrt(v) + tau), without bias correction, as in the
// paper. Options server-lr (0.1), beta1 (0.9), beta2 (0.99), tau (1e-9),
// Flower's defaults. Adaptive per-parameter server steps for heterogeneous
// leaves.
//
// fedyogi: FedYogi (Reddi et al. 2021): as fedadam with
// v = v - (1-beta2) * d^2 * sign(v - d^2), which grows v more gently.
// Options server-lr (0.01), beta1 (0.9), beta2 (0.99), tau (1e-3).
//
// fedadagrad: FedAdagrad (Reddi et al. 2021): as fedadam with v = v + d^2,
// so steps shrink for parameters that have moved a lot. Options server-lr
// (0.1), beta1 (0, as in Flower), tau (1e-9).
//
// The four server optimizers need the previous global model (WithGlobal) and
// carry m (and v) from round to round in a state file (WithState,
// WithStateOut); without a state they start from zero. Integer tensors are
// plain fedavg. Incremental or blocked.
//
// dp-fedavg: central differential privacy, DP-FedAvg (McMahan et al. 2018).
// Each update's delta to the global model, over all its float tensors, is
// clipped to L2 norm clip C; the clipped deltas are averaged unweighted (each
// of the K updates counts once, so one leaf moves the mean by at most C/K);
// Gaussian noise of standard deviation noise-multiplier Z times C/K is added
// to every float parameter, drawn from a generator seeded by seed (a given
// parameter's draw does not depend on block size or workers). The result is
// the global model plus that; integer tensors are plain fedavg, without
// noise. clip and noise-multiplier are required. Privacy accounting over
// rounds is the operator's. Needs the global model; incremental or blocked.
//
// # Sampling
//
// Sample(n, k, seed) picks k of n updates uniformly without replacement,
// the same for a seed on every machine; the command and the server share it.
//
// # Speed and memory
//
// Blocks are read with ReadAt into reused buffers, never mmapped, since
// file-backed pages would count in the process's resident memory. The fold
// over little-endian float32 and float64 reads the bytes in place, and on
// amd64 with AVX2 (detected at start) uses small assembly kernels that give
// the same bits as the Go loops they replace. Median and trimmed-mean sort
// each block's values with a branch-free sorting network over whole rows.
// An Accumulator holds 8 bytes per parameter; Aggregate about 2 MiB per
// worker for fedavg and max(512 KiB, updates x 32 KiB) per worker for the
// strategies that need all updates.
//
// The package uses the standard library and package weights only.
package aggregate
