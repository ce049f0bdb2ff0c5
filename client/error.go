package client

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/branchkey/branchkey"
)

// Error is an error the server answered, or a failure to reach it. Match it
// with errors.As; Code is one of branchkey's error codes (EINVALID,
// EUNAUTHORIZED, ...), mapped back from the HTTP status when the body does
// not say.
type Error struct {
	// Status is the HTTP status, 0 when the server was not reached.
	Status int
	// Code is the domain error code.
	Code string
	// Message is the server's explanation.
	Message string
	// Err is the transport error when the server was not reached.
	Err error
}

// Error implements the error interface.
func (e *Error) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("branchkey server unreachable: %s", e.Message)
	}
	return fmt.Sprintf("branchkey server: %d %s: %s", e.Status, e.Code, e.Message)
}

// Unwrap returns the transport error, if any.
func (e *Error) Unwrap() error { return e.Err }

// Temporary reports whether retrying may succeed: the server was not
// reached, or answered 429, 502, 503 or 504.
func (e *Error) Temporary() bool {
	switch e.Status {
	case 0, http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
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
	e := &Error{Status: resp.StatusCode, Code: codes[resp.StatusCode]}
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
