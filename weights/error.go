package weights

import (
	"errors"
	"fmt"
	"strings"
)

// Error is a malformed or refused weights file. It says where: the byte
// offset, the pickle opcode being read, and the tensor, when they apply.
type Error struct {
	// Offset is the byte offset in the file where the problem was found, or
	// -1.
	Offset int64
	// Op is the name of the pickle opcode being read ("BINBYTES"), if any.
	Op string
	// Tensor is the index of the tensor concerned, or -1.
	Tensor int
	// Msg says what is wrong.
	Msg string
}

// Error implements the error interface.
func (e *Error) Error() string {
	var parts []string
	if e.Tensor >= 0 {
		parts = append(parts, fmt.Sprintf("tensor %d", e.Tensor))
	}
	if e.Op != "" {
		parts = append(parts, fmt.Sprintf("opcode %s at byte %d", e.Op, e.Offset))
	} else if e.Offset >= 0 {
		parts = append(parts, fmt.Sprintf("byte %d", e.Offset))
	}
	if len(parts) == 0 {
		return e.Msg
	}
	return strings.Join(parts, ", ") + ": " + e.Msg
}

// ErrTruncated is matched (with errors.Is) by every error about input that
// ends early.
var ErrTruncated = errors.New("file ends early")

// Is makes errors.Is(err, ErrTruncated) true for truncation errors.
func (e *Error) Is(target error) bool {
	return target == ErrTruncated && strings.Contains(e.Msg, ErrTruncated.Error())
}

// AsError returns the *Error in err's chain, or nil.
func AsError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return nil
}
