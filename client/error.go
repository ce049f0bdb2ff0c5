package client

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/branchkey/branchkey"
)

// Error is an error the server answered, a failure to reach it, or a
// failure the client found on its own (a file that is not a valid weights
// file, incomplete credentials, a download the server cut short). Match it
// with errors.As; Code is one of branchkey's error codes (EINVALID,
// EUNAUTHORIZED, ...), mapped back from the HTTP status when the body does
// not say. An *Error also matches a *branchkey.Error with the same code and
// message, so branchkey.ErrorCode works on it.
type Error struct {
	// Status is the HTTP status, 0 when the server was not reached or did
	// not answer this.
	Status int
	// Code is the domain error code.
	Code string
	// Message is the server's explanation, or the client's.
	Message string
	// RetryAfter is the wait the server asked for with Retry-After (429,
	// 503), 0 if none.
	RetryAfter time.Duration
	// Err is the underlying error: the transport's when the server was not
	// reached.
	Err error
}

// Error implements the error interface.
func (e *Error) Error() string {
	switch {
	case e.Status != 0:
		return fmt.Sprintf("branchkey server: %d %s: %s", e.Status, e.Code, e.Message)
	case e.Code == branchkey.EUNAVAILABLE:
		return fmt.Sprintf("branchkey server unreachable: %s", e.Message)
	}
	return fmt.Sprintf("branchkey client: %s: %s", e.Code, e.Message)
}

// Unwrap returns the underlying error, if any, and the domain error.
func (e *Error) Unwrap() []error {
	errs := []error{&branchkey.Error{Code: e.Code, Message: e.Message}}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

// Temporary reports whether retrying may succeed: the server was not
// reached, or answered 429, 500, 502, 503 or 504.
func (e *Error) Temporary() bool {
	switch e.Status {
	case 0:
		return e.Code == branchkey.EUNAVAILABLE
	case http.StatusTooManyRequests, http.StatusInternalServerError, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// unreachable wraps a transport error: the server was not reached or the
// connection broke.
func unreachable(err error) *Error {
	return &Error{Code: branchkey.EUNAVAILABLE, Message: err.Error(), Err: err}
}

// clientError is a failure the client found itself.
func clientError(code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// codes maps HTTP statuses back to domain error codes.
var codes = map[int]string{
	http.StatusBadRequest:            branchkey.EINVALID,
	http.StatusUnauthorized:          branchkey.EUNAUTHORIZED,
	http.StatusForbidden:             branchkey.EFORBIDDEN,
	http.StatusNotFound:              branchkey.ENOTFOUND,
	http.StatusConflict:              branchkey.ECONFLICT,
	http.StatusRequestEntityTooLarge: branchkey.ETOOLARGE,
	http.StatusServiceUnavailable:    branchkey.EUNAVAILABLE,
	http.StatusTooManyRequests:       branchkey.EUNAVAILABLE,
	http.StatusBadGateway:            branchkey.EUNAVAILABLE,
	http.StatusGatewayTimeout:        branchkey.EUNAVAILABLE,
}

// errorFrom reads an error answer.
func errorFrom(resp *http.Response) *Error {
	e := &Error{Status: resp.StatusCode, Code: codes[resp.StatusCode], RetryAfter: retryAfter(resp.Header.Get("Retry-After"))}
	if e.Code == "" {
		e.Code = branchkey.EINTERNAL
	}
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var body struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Error   string `json:"error"`
	}
	if json.Unmarshal(b, &body) == nil {
		if body.Code != "" {
			e.Code = body.Code
		}
		e.Message = body.Message
		if e.Message == "" {
			e.Message = body.Error
		}
	}
	if e.Message == "" {
		e.Message = strings.TrimSpace(string(b))
		if e.Message == "" {
			e.Message = http.StatusText(resp.StatusCode)
		}
	}
	return e
}

// retryAfter parses a Retry-After value: seconds or an HTTP date. It is
// capped at a minute, so a confused proxy cannot stall a client for hours.
func retryAfter(v string) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	var d time.Duration
	if n, err := strconv.Atoi(v); err == nil {
		d = time.Duration(n) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = time.Until(t)
	}
	return min(max(d, 0), time.Minute)
}
