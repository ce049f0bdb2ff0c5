package client

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/branchkey/branchkey"
)

// Notification is a message the server sent to every leaf of the branch.
type Notification struct {
	// Type is branchkey.MessageAggregationStatus ("aggregation_status")
	// or branchkey.MessageRunStatus ("run_status").
	Type string `json:"message_type"`
	// ID identifies the message: the AMQP message_id, or the Server-Sent
	// Events id (WithLastEventID resumes after it).
	ID string `json:"id"`
	// AggregationID is the aggregate's file id, for FileDownload
	// (aggregation_status).
	AggregationID string `json:"aggregation_id,omitempty"`
	// Run and Round number the run and the round that was aggregated
	// (aggregation_status), or the run and the round that accepts uploads
	// now (run_status).
	Run   int `json:"run,omitempty"`
	Round int `json:"round,omitempty"`
	// NumSamples is the aggregate's total number of samples
	// (aggregation_status).
	NumSamples int64 `json:"num_samples,omitempty"`
	// RunStatus is the run's new state (run_status).
	RunStatus branchkey.RunStatus `json:"run_status,omitempty"`
	// Body is the message's body as the server sent it, with any field
	// not listed above.
	Body json.RawMessage `json:"body"`
}

// parseNotification reads a message payload:
// {"message_type": ..., "body": {...}}. Body fields of an unexpected type
// are left zero, so a server adding or changing a field cannot stop the
// consumer; only a payload that is not such an object is an error.
func parseNotification(payload []byte, id string) (Notification, error) {
	var msg struct {
		Type string          `json:"message_type"`
		Body json.RawMessage `json:"body"`
	}
	if err := json.Unmarshal(payload, &msg); err != nil {
		return Notification{}, fmt.Errorf("message %s is not JSON: %w", id, err)
	}
	if msg.Type == "" {
		return Notification{}, fmt.Errorf("message %s has no message_type", id)
	}
	n := Notification{Type: msg.Type, ID: id, Body: msg.Body}
	var body map[string]json.RawMessage
	if err := json.Unmarshal(msg.Body, &body); err != nil {
		return n, nil
	}
	str := func(k string) string {
		var s string
		_ = json.Unmarshal(body[k], &s)
		return s
	}
	num := func(k string) int64 {
		var f float64
		if json.Unmarshal(body[k], &f) == nil {
			return int64(f)
		}
		n, _ := strconv.ParseInt(str(k), 10, 64)
		return n
	}
	n.AggregationID = str("aggregation_id")
	n.Round = int(num("round"))
	n.NumSamples = num("num_samples")
	n.RunStatus = branchkey.RunStatus(str("run_status"))
	n.Run = int(num("run"))
	if n.Run == 0 {
		n.Run = int(num("run_number"))
	}
	return n, nil
}

// Updates returns the channel notifications arrive on once Login started
// the consumer: aggregation_status (an aggregate is ready to download) and
// run_status (the branch's run started, paused or stopped). Messages the
// transport delivers twice are dropped. A message is acknowledged to the
// broker once it is in the channel (see WithUpdatesBuffer).
//
// The channel is closed when the consumer stops: after Logout or Close, or
// when it cannot go on (Err says why). A later Login opens a new channel,
// which Updates then returns.
func (c *Client) Updates() <-chan Notification {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.updates
}

// Err returns why the consumer stopped on its own (its login was refused
// for good), or nil.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// connector holds one connection of a notification transport: it delivers
// what arrives until the connection ends, and returns why. An
// EUNAUTHORIZED *Error means the broker or server refused the session.
type connector func(ctx context.Context, s *Session, deliver func(context.Context, Notification) error) (delivered bool, err error)

// startConsumer starts the consumer goroutine unless it runs.
func (c *Client) startConsumer(ctx context.Context) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stop != nil {
		return
	}
	if c.started {
		// The last consumer closes its channel (or has): a new one, so a
		// Login racing a Logout cannot send on a closed channel.
		c.updates = make(chan Notification, c.bufSize)
	}
	c.started = true
	c.err = nil
	out := c.updates
	conn, name := c.consumeSSE, "sse"
	if c.Transport() == TransportAMQP {
		conn, name = c.consumeAMQP, "amqp"
	}
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	c.stop, c.done = cancel, done
	go func() {
		defer close(done)
		err := c.consume(cctx, name, conn, out)
		c.mu.Lock()
		if c.updates == out {
			c.err = err
		}
		c.mu.Unlock()
		close(out)
	}()
}

// stopConsumer stops the consumer, if it runs, and waits for it.
func (c *Client) stopConsumer() {
	c.mu.Lock()
	stop, done := c.stop, c.done
	c.stop, c.done = nil, nil
	c.mu.Unlock()
	if stop == nil {
		return
	}
	stop()
	<-done
}

// consume keeps a transport connected until ctx ends, reconnecting with
// backoff, and logging in again when the session is refused. It returns
// nil when stopped and an error when it cannot go on: the login itself is
// refused for good.
func (c *Client) consume(ctx context.Context, name string, conn connector, out chan<- Notification) error {
	log := c.log.With("transport", name)
	deliver := func(ctx context.Context, n Notification) error {
		if n.Type == branchkey.MessageRunStatus && n.RunStatus != "" {
			c.mu.Lock()
			c.runStatus = n.RunStatus
			c.mu.Unlock()
		}
		select {
		case out <- n:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	failures := 0
	relogged := false
	for ctx.Err() == nil {
		s, err := c.session(ctx)
		if err != nil {
			if !retryable(ctx, err) {
				return c.consumerFailed(ctx, log, err)
			}
		} else {
			start := time.Now()
			delivered, cerr := conn(ctx, s, deliver)
			if ctx.Err() != nil {
				return nil
			}
			if delivered || time.Since(start) > time.Minute {
				failures = 0
			}
			err = cerr
			if isUnauthorized(cerr) {
				if lerr := c.relogin(ctx, s); lerr != nil {
					if !retryable(ctx, lerr) {
						return c.consumerFailed(ctx, log, lerr)
					}
					err = lerr
				} else if !relogged {
					// A fresh token; try it at once, but only once in a row.
					relogged = true
					log.Info("the session was refused; logged in again", "err", cerr)
					continue
				}
			} else {
				relogged = false
			}
		}
		d := c.retry.backoff(failures, err)
		if name == "sse" {
			d = max(d, c.sseRetry())
		}
		log.Warn("notifications disconnected; reconnecting", "wait", d, "err", err)
		failures++
		if sleep(ctx, d) != nil {
			return nil
		}
	}
	return nil
}

// consumerFailed logs why the consumer stops for good and returns it; nil
// when it was stopped.
func (c *Client) consumerFailed(ctx context.Context, log *slog.Logger, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	log.Error("notifications stopped: the login was refused", "err", err)
	return fmt.Errorf("notifications for leaf %s: %w", c.creds.LeafName, err)
}

// seenIDs remembers the last ids delivered, to drop redeliveries.
type seenIDs struct {
	set  map[string]bool
	ring []string
	next int
}

func newSeenIDs(n int) *seenIDs {
	return &seenIDs{set: make(map[string]bool, n), ring: make([]string, n)}
}

func (s *seenIDs) has(id string) bool { return s.set[id] }

func (s *seenIDs) add(id string) {
	if s.set[id] {
		return
	}
	if old := s.ring[s.next]; old != "" {
		delete(s.set, old)
	}
	s.ring[s.next] = id
	s.set[id] = true
	s.next = (s.next + 1) % len(s.ring)
}

// errConnection marks a notification connection that ended or failed:
// reconnecting is the remedy.
var errConnection = errors.New("notification connection ended")
