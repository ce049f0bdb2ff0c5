package aggregate

import (
	"errors"
)

// Kinds of InputError, matched with errors.Is. Each is bad input (an HTTP
// 400 in the server), never a fault of the engine.
var (
	// ErrMalformed: the input is not a valid weights file.
	ErrMalformed = errors.New("not a valid update")
	// ErrMismatch: the input disagrees with the round's first update in its
	// tensor count, a shape, a dtype kind (float against integer) or a
	// tensor's memory order.
	ErrMismatch = errors.New("update disagrees with the others")
	// ErrNonFinite: the input holds NaN or Inf and the Config does not allow
	// them.
	ErrNonFinite = errors.New("update holds NaN or Inf")
	// ErrDuplicate: two inputs of one aggregation have the same name.
	ErrDuplicate = errors.New("update given twice")
)

// ErrBroken is returned by an Accumulator that failed in the middle of
// folding an update (a read error), so that its sum is no longer known. The
// round can still be aggregated with Aggregate from the stored updates.
var ErrBroken = errors.New("aggregate: accumulator is broken by an earlier read error")

// InputError is an input the engine refuses. Its message names the input
// and, where it applies, the tensor, with both sides of a disagreement:
// "update leaf3.npy: tensor 2 has shape (6, 5), the first update's is
// (6, 4)". Match its kind with errors.Is(err, ErrMismatch) and friends.
type InputError struct {
	// Role is what the input is: "update", "global model" or "state".
	Role string
	// Input is the input's name.
	Input string
	// Tensor is the index of the tensor concerned, or -1.
	Tensor int
	// Kind is ErrMalformed, ErrMismatch, ErrNonFinite or ErrDuplicate.
	Kind error
	// Msg says what is wrong, naming the tensor.
	Msg string
	// Err is the underlying error, such as a *weights.Error, or nil.
	Err error
}

// Error implements the error interface.
func (e *InputError) Error() string {
	return e.Role + " " + e.Input + ": " + e.Msg
}

// Unwrap returns the kind and the underlying error, for errors.Is and
// errors.As.
func (e *InputError) Unwrap() []error {
	if e.Err != nil {
		return []error{e.Kind, e.Err}
	}
	return []error{e.Kind}
}

// ConfigError is a strategy or option the engine cannot run: an unknown
// strategy or option, a value out of range, or a count of updates the
// strategy cannot work with. Its message starts with the strategy:
// "trimmed-mean: --trim must be in [0, 0.5), got 0.7".
type ConfigError struct {
	// Strategy is the strategy as given.
	Strategy string
	// Option is the option concerned, without dashes, or "".
	Option string
	// Msg says what is wrong, naming the option and its value.
	Msg string
}

// Error implements the error interface.
func (e *ConfigError) Error() string {
	if e.Strategy == "" {
		return e.Msg
	}
	return e.Strategy + ": " + e.Msg
}
