package branchkey

import (
	"errors"
	"fmt"
)

// Error codes. Each maps to one HTTP status in httpapi and back to a typed
// error in the Go client.
const (
	EINVALID      = "invalid"      // the request or file is malformed (400)
	EUNAUTHORIZED = "unauthorized" // bad or missing credentials (401)
	EFORBIDDEN    = "forbidden"    // authenticated, but not allowed (403)
	ENOTFOUND     = "not_found"    // no such tree, branch, leaf or file (404)
	ECONFLICT     = "conflict"     // the state does not allow it: paused run, existing id (409)
	ETOOLARGE     = "too_large"    // over a configured size limit (413)
	EUNAVAILABLE  = "unavailable"  // a dependency (broker, database) is down; retry later (503)
	EINTERNAL     = "internal"     // a bug or an unexpected failure; details are only logged (500)
)

// Error is the domain error: a short machine-readable code and a message for
// humans that names the thing that is wrong.
type Error struct {
	Code    string
	Message string
}

// Error implements the error interface.
func (e *Error) Error() string {
	return fmt.Sprintf("branchkey error: code=%s message=%s", e.Code, e.Message)
}

// Errorf returns an *Error with the code and a formatted message.
func Errorf(code string, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// ErrorCode returns the code of the first *Error in err's chain, "" for nil
// and EINTERNAL for any other error.
func ErrorCode(err error) string {
	var e *Error
	if err == nil {
		return ""
	} else if errors.As(err, &e) {
		return e.Code
	}
	return EINTERNAL
}

// ErrorMessage returns the message of the first *Error in err's chain, "" for
// nil and a generic text for any other error, so internals never leak.
func ErrorMessage(err error) string {
	var e *Error
	if err == nil {
		return ""
	} else if errors.As(err, &e) {
		return e.Message
	}
	return "internal error"
}
