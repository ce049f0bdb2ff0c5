package rabbitmq

import (
	"errors"
	"fmt"
	"net/url"

	"github.com/branchkey/branchkey"
)

// codedError is a domain error that also keeps the low-level error that
// caused it, so callers can use both branchkey.ErrorCode and errors.Is.
type codedError struct {
	err   *branchkey.Error
	cause error
}

func (e *codedError) Error() string { return e.err.Error() }

func (e *codedError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.err}
	}
	return []error{e.err, e.cause}
}

// coded returns an error with the domain code whose message is what failed
// followed by the cause, and which wraps the cause.
func coded(code string, cause error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if cause != nil {
		msg += ": " + cause.Error()
	}
	return &codedError{err: branchkey.Errorf(code, "%s", msg), cause: cause}
}

// unavailable is coded(EUNAVAILABLE, ...): the broker cannot be reached or
// refused to take the work for now; the caller retries later.
func unavailable(cause error, format string, args ...any) error {
	return coded(branchkey.EUNAVAILABLE, cause, format, args...)
}

// maxNameLen is the longest AMQP short string, the limit on vhost, exchange,
// queue and user names.
const maxNameLen = 255

// checkName rejects names RabbitMQ or the management API's URLs cannot carry.
// Ids are letters, digits and '-' by the wire contract, but tree and branch
// ids are chosen by operators, so only what would break is refused.
func checkName(kind, name string) error {
	switch {
	case name == "":
		return branchkey.Errorf(branchkey.EINVALID, "%s id is empty", kind)
	case len(name) > maxNameLen:
		return branchkey.Errorf(branchkey.EINVALID, "%s id %.20q... is %d bytes long, RabbitMQ allows %d", kind, name, len(name), maxNameLen)
	case name == "." || name == "..":
		return branchkey.Errorf(branchkey.EINVALID, "%s id %q cannot be used in a URL path", kind, name)
	}
	return nil
}

// parseURLError returns err without the URL text url.Parse puts in its
// errors, because that text holds the password.
func parseURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
