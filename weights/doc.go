// Package weights reads and writes the weights file leaves upload and
// download: a numpy object array (num_samples, [ndarray, ...]) saved with
// np.save, that is an .npy header followed by a pickle stream (see
// shared/spec/weights-format.md).
//
// The pickle is read by a restricted unpickler of our own. It understands the
// handful of opcodes numpy's pickles use and accepts exactly three globals,
// numpy's array rebuilder (_reconstruct), numpy.ndarray and numpy.dtype (and
// ml_dtypes.bfloat16 as a dtype name). Nothing is ever called: the globals
// are tokens whose arguments are checked against the shapes numpy produces.
// Every allocation is bounded by the bytes the input really holds, so a
// length claim larger than the input fails before anything is allocated.
//
// Three ways to read:
//   - ReadFile/Decode materialize every tensor's bytes;
//   - Index records where each tensor's bytes lie in a file (offset and
//     length) without reading them, at a cost that does not grow with tensor
//     size, for the aggregator to stream from disk;
//   - Scan reads a stream once (an upload as it arrives), handing each
//     tensor's bytes to a callback in element-aligned chunks and keeping none.
//
// Encoder and Encode write the same format, byte for byte what numpy 1.x's
// np.save writes for the same arrays, streaming tensor data so aggregates of
// any size can be written without holding them.
//
// The package depends on the standard library only.
package weights
