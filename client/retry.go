package client

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/branchkey/branchkey"
)

// RetryPolicy says how transient failures are retried: the server not
// reached or the connection broken, and the answers 429, 500, 502, 503 and
// 504. Waits grow exponentially from MinBackoff to MaxBackoff, with
// jitter, and are at least what a Retry-After header asked for.
type RetryPolicy struct {
	// Attempts is how many times one call is tried in all; 1 disables
	// retries. The notification consumer ignores it: it reconnects until
	// it is stopped.
	Attempts int
	// MinBackoff is the wait after the first failure.
	MinBackoff time.Duration
	// MaxBackoff caps the wait.
	MaxBackoff time.Duration
}

// DefaultRetryPolicy is the policy a Client uses unless WithRetry says
// otherwise: 8 attempts, waits from 250ms to 15s (about a minute in all).
var DefaultRetryPolicy = RetryPolicy{Attempts: 8, MinBackoff: 250 * time.Millisecond, MaxBackoff: 15 * time.Second}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.Attempts < 1 {
		p.Attempts = DefaultRetryPolicy.Attempts
	}
	if p.MinBackoff <= 0 {
		p.MinBackoff = DefaultRetryPolicy.MinBackoff
	}
	if p.MaxBackoff < p.MinBackoff {
		p.MaxBackoff = max(p.MinBackoff, DefaultRetryPolicy.MaxBackoff)
	}
	return p
}

// backoff returns the wait before retry number attempt+1 (attempt counts
// from 0): MinBackoff doubled attempt times, capped at MaxBackoff, of which
// a random half is taken away, and at least what err's Retry-After says.
func (p RetryPolicy) backoff(attempt int, err error) time.Duration {
	d := p.MinBackoff
	for i := 0; i < attempt && d < p.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, p.MaxBackoff)
	d = d/2 + rand.N(d/2+1)
	var e *Error
	if errors.As(err, &e) && e.RetryAfter > d {
		d = e.RetryAfter
	}
	return d
}

// retryable reports whether err is worth another attempt while ctx lives.
func retryable(ctx context.Context, err error) bool {
	if err == nil || ctx.Err() != nil {
		return false
	}
	var e *Error
	return errors.As(err, &e) && e.Temporary()
}

// isUnauthorized reports whether the server refused the session: its token
// expired or was revoked, and a new login may help.
func isUnauthorized(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == branchkey.EUNAUTHORIZED
}

// sleep waits d or until ctx is done, and returns ctx's error then.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stallError is the cause of an attempt cancelled because no byte moved
// for the stall timeout.
var errStalled = errors.New("no data moved within the stall timeout")

// watchdog cancels an attempt's context when it is not kicked for a while:
// a connection that silently stopped moving bytes is given up and retried
// instead of waiting forever.
type watchdog struct {
	t *time.Timer
	d time.Duration
}

// newWatchdog returns a context that is cancelled with errStalled when the
// watchdog is not kicked for d, and the watchdog. stop releases both.
func newWatchdog(ctx context.Context, d time.Duration) (context.Context, *watchdog, func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	w := &watchdog{d: d, t: time.AfterFunc(d, func() { cancel(errStalled) })}
	return ctx, w, func() {
		w.t.Stop()
		cancel(nil)
	}
}

// kick restarts the countdown.
func (w *watchdog) kick() { w.t.Reset(w.d) }

// pause stops the countdown until the next kick.
func (w *watchdog) pause() { w.t.Stop() }

// transportError turns an error of http.Client.Do or of reading a body into
// the error the caller sees: ctx's error when the caller gave up, a
// temporary *Error when the connection broke or stalled.
func transportError(ctx, attemptCtx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if context.Cause(attemptCtx) == errStalled {
		return unreachable(errStalled)
	}
	return unreachable(err)
}
