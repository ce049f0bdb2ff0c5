package rabbitmq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/branchkey/branchkey"
	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	// DefaultDialTimeout bounds opening one connection of a Notifier.
	DefaultDialTimeout = 5 * time.Second
	// DefaultMinBackoff is a Notifier's wait after a first failed dial.
	DefaultMinBackoff = 100 * time.Millisecond
	// DefaultMaxBackoff caps a Notifier's wait between failed dials.
	DefaultMaxBackoff = 5 * time.Second
	// closeTimeout bounds closing one connection in Close.
	closeTimeout = 5 * time.Second
)

// Notifier publishes messages to RabbitMQ: each message goes to the fanout
// exchange of its branch in the virtual host of its tree, so every leaf of
// the branch gets it in its queue. It keeps one connection per virtual host,
// opened on the first Publish and opened again, with backoff, after the
// broker closed it. It is safe for concurrent use: concurrent publishes share
// a channel and wait for their confirms together.
type Notifier struct {
	url         string
	logger      *slog.Logger
	dialTimeout time.Duration
	minBackoff  time.Duration
	maxBackoff  time.Duration

	mu     sync.Mutex
	closed bool
	vhosts map[string]*vhost
	// watchers counts the goroutines that watch connections; Close waits
	// for them.
	watchers sync.WaitGroup
}

var _ branchkey.Notifier = (*Notifier)(nil)

// NotifierOption configures a Notifier built by NewNotifier.
type NotifierOption func(*Notifier)

// WithDialTimeout bounds opening a connection (TCP and the AMQP handshake),
// on top of the caller's context. The default is DefaultDialTimeout.
func WithDialTimeout(d time.Duration) NotifierOption {
	return func(n *Notifier) { n.dialTimeout = d }
}

// WithReconnectBackoff sets the wait after a failed connection attempt
// before the next one: min after the first failure, doubling up to max.
// While it lasts Publish fails at once with the last attempt's error. The
// defaults are DefaultMinBackoff and DefaultMaxBackoff.
func WithReconnectBackoff(min, max time.Duration) NotifierOption {
	return func(n *Notifier) { n.minBackoff, n.maxBackoff = min, max }
}

// NewNotifier returns a Notifier that connects with amqpURL
// ("amqp://user:password@host:5672/"); the URL's virtual host is replaced by
// each message's tree. It does not connect until the first Publish. A nil
// logger discards.
func NewNotifier(amqpURL string, logger *slog.Logger, opts ...NotifierOption) (*Notifier, error) {
	if _, err := amqp.ParseURI(amqpURL); err != nil {
		return nil, fmt.Errorf("rabbitmq: AMQP URL: %w", parseURLError(err))
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	n := &Notifier{
		url:         amqpURL,
		logger:      logger,
		dialTimeout: DefaultDialTimeout,
		minBackoff:  DefaultMinBackoff,
		maxBackoff:  DefaultMaxBackoff,
		vhosts:      make(map[string]*vhost),
	}
	for _, o := range opts {
		o(n)
	}
	if n.dialTimeout <= 0 {
		n.dialTimeout = DefaultDialTimeout
	}
	if n.minBackoff <= 0 {
		n.minBackoff = DefaultMinBackoff
	}
	if n.maxBackoff < n.minBackoff {
		n.maxBackoff = n.minBackoff
	}
	return n, nil
}

// Publish sends m.Payload() to the exchange m.BranchID in the virtual host
// m.TreeID as a persistent JSON message whose message id is m.ID and whose
// type is m.Type, and returns nil once the broker confirmed it.
//
// Errors: EUNAVAILABLE when the broker cannot be reached, closed the
// connection or channel before confirming, nacked the message, blocks
// publishers (resource alarm) or did not confirm before ctx ended, and
// after Close: the caller keeps the message and retries. ENOTFOUND when the
// tree's virtual host or the branch's exchange does not exist: the Broker
// creates both with the branch's first leaf, so no leaf could receive the
// message. EINVALID for a message without ids.
func (n *Notifier) Publish(ctx context.Context, m *branchkey.Message) error {
	if m == nil {
		return branchkey.Errorf(branchkey.EINVALID, "publish: no message")
	}
	if err := checkNames("tree", m.TreeID, "branch", m.BranchID); err != nil {
		return err
	}
	if m.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "publish: message to branch %s of tree %s has no id", m.BranchID, m.TreeID)
	}
	v, err := n.vhost(m.TreeID)
	if err != nil {
		return err
	}
	l, pub, err := v.channel(ctx, m.BranchID)
	if err != nil {
		return err
	}
	if reason := l.blocked.Load(); reason != nil {
		return unavailable(nil, "publish message %s to vhost %q: the broker blocks publishers: %s", m.ID, m.TreeID, *reason)
	}
	ts := m.CreatedAt
	if ts.IsZero() {
		ts = time.Now()
	}
	dc, err := pub.ch.PublishWithDeferredConfirmWithContext(ctx, m.BranchID, "", false, false, amqp.Publishing{
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		MessageId:    m.ID,
		Type:         m.Type,
		Timestamp:    ts,
		AppId:        "branchkey",
		Body:         m.Payload(),
	})
	if err != nil {
		if ctx.Err() != nil {
			return unavailable(ctx.Err(), "publish message %s to exchange %q in vhost %q", m.ID, m.BranchID, m.TreeID)
		}
		return unavailable(err, "publish message %s to exchange %q in vhost %q", m.ID, m.BranchID, m.TreeID)
	}
	acked, err := dc.WaitContext(ctx)
	switch {
	case err != nil:
		return unavailable(err, "publish message %s to exchange %q in vhost %q: no confirm from the broker", m.ID, m.BranchID, m.TreeID)
	case acked:
		return nil
	case pub.ch.IsClosed():
		// amqp091 nacks what is outstanding when a channel closes; the
		// message may or may not have reached the queues.
		return unavailable(pub.closeReason(), "publish message %s to exchange %q in vhost %q: channel closed before the broker confirmed", m.ID, m.BranchID, m.TreeID)
	default:
		return unavailable(nil, "publish message %s to exchange %q in vhost %q: the broker nacked it", m.ID, m.BranchID, m.TreeID)
	}
}

// Close closes the connections and waits for the goroutines that watch
// them. Publish fails with EUNAVAILABLE after it.
func (n *Notifier) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	vs := make([]*vhost, 0, len(n.vhosts))
	for _, v := range n.vhosts {
		vs = append(vs, v)
	}
	n.mu.Unlock()

	var errs []error
	for _, v := range vs {
		// Not bounded by a context: whoever holds the lock is dialling,
		// which the dial timeout bounds.
		v.lock <- struct{}{}
		if v.link != nil {
			if err := v.link.conn.CloseDeadline(time.Now().Add(closeTimeout)); err != nil && !errors.Is(err, amqp.ErrClosed) {
				errs = append(errs, fmt.Errorf("rabbitmq: close connection to vhost %q: %w", v.name, err))
			}
			v.link = nil
		}
		<-v.lock
	}
	n.watchers.Wait()
	return errors.Join(errs...)
}

func (n *Notifier) isClosed() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.closed
}

// vhost returns the state of one virtual host, creating it on first use.
func (n *Notifier) vhost(name string) (*vhost, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, errNotifierClosed()
	}
	v, ok := n.vhosts[name]
	if !ok {
		v = &vhost{n: n, name: name, lock: make(chan struct{}, 1)}
		n.vhosts[name] = v
	}
	return v, nil
}

func errNotifierClosed() error {
	return branchkey.Errorf(branchkey.EUNAVAILABLE, "rabbitmq notifier is closed")
}

// vhost is the connection state of one virtual host.
type vhost struct {
	n    *Notifier
	name string
	// lock guards the fields below. It is a channel so waiting for it can
	// honour a context.
	lock chan struct{}
	link *link
	// After a failed dial, Publish fails with dialErr until retryAt.
	failures int
	retryAt  time.Time
	dialErr  error
}

// link is one AMQP connection and its publishing channel.
type link struct {
	conn *amqp.Connection
	// pub is the publishing channel; guarded by the vhost's lock.
	pub *pubChannel
	// blocked is the broker's reason while it blocks publishers.
	blocked atomic.Pointer[string]
}

// pubChannel is a channel in confirm mode that publishes.
type pubChannel struct {
	ch     *amqp.Channel
	closes chan *amqp.Error
	// exchanges holds the exchanges known to exist; guarded by the vhost's
	// lock.
	exchanges map[string]bool

	mu     sync.Mutex
	reason *amqp.Error
}

// channel returns the vhost's publishing channel, connecting first if
// needed, after checking that exchange exists.
func (v *vhost) channel(ctx context.Context, exchange string) (*link, *pubChannel, error) {
	select {
	case v.lock <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, unavailable(ctx.Err(), "publish to vhost %q: waiting for the connection", v.name)
	}
	defer func() { <-v.lock }()

	if v.n.isClosed() {
		return nil, nil, errNotifierClosed()
	}
	if v.link != nil && v.link.conn.IsClosed() {
		v.link = nil // the watcher logged why
	}
	if v.link == nil {
		if err := v.connect(ctx); err != nil {
			return nil, nil, err
		}
	}
	l := v.link
	if l.pub == nil || l.pub.ch.IsClosed() {
		if l.pub != nil {
			v.n.logger.Warn("publishing channel closed, opening another", "vhost", v.name, "reason", l.pub.closeReason())
		}
		pub, err := openPubChannel(l.conn)
		if err != nil {
			_ = l.conn.Close()
			v.link = nil
			return nil, nil, unavailable(err, "publish to vhost %q: open a channel", v.name)
		}
		l.pub = pub
	}
	if !l.pub.exchanges[exchange] {
		if err := checkExchange(l.conn, v.name, exchange); err != nil {
			return nil, nil, err
		}
		l.pub.exchanges[exchange] = true
	}
	return l, l.pub, nil
}

// connect dials the vhost unless a recent attempt failed, and starts the
// goroutine that watches the new connection. The caller holds the lock.
func (v *vhost) connect(ctx context.Context) error {
	n := v.n
	if now := time.Now(); now.Before(v.retryAt) {
		return fmt.Errorf("%w (next attempt in %s)", v.dialErr, v.retryAt.Sub(now).Round(time.Millisecond))
	}
	conn, err := n.dial(ctx, v.name)
	if err != nil {
		var aerr *amqp.Error
		switch {
		case ctx.Err() != nil:
			// The caller gave up; that says nothing about the broker.
			return unavailable(ctx.Err(), "connect to vhost %q", v.name)
		case errors.As(err, &aerr) && aerr.Code == amqp.NotAllowed && strings.HasSuffix(aerr.Reason, "not found"):
			// RabbitMQ answers connection.open for a missing vhost with 530
			// "NOT_ALLOWED - vhost X not found"; the code alone also covers
			// access refusals and connection limits. Not remembered, so the
			// vhost is used as soon as it exists.
			return coded(branchkey.ENOTFOUND, err, "connect to vhost %q", v.name)
		}
		v.failures++
		backoff := min(n.minBackoff<<min(v.failures-1, 20), n.maxBackoff)
		backoff = backoff/2 + rand.N(backoff/2+1)
		v.retryAt = time.Now().Add(backoff)
		v.dialErr = unavailable(err, "connect to vhost %q (attempt %d)", v.name, v.failures)
		n.logger.Warn("cannot connect to RabbitMQ", "vhost", v.name, "attempt", v.failures, "retry_in", backoff, "err", err)
		return v.dialErr
	}
	if v.failures > 0 {
		n.logger.Info("connected to RabbitMQ again", "vhost", v.name, "failed_attempts", v.failures)
	} else {
		n.logger.Debug("connected to RabbitMQ", "vhost", v.name)
	}
	v.failures, v.retryAt, v.dialErr = 0, time.Time{}, nil
	l := &link{conn: conn}
	closes := conn.NotifyClose(make(chan *amqp.Error, 1))
	blocks := conn.NotifyBlocked(make(chan amqp.Blocking, 1))
	n.watchers.Add(1)
	go n.watch(v.name, l, closes, blocks)
	v.link = l
	return nil
}

// dial opens a connection to vhost, bounded by ctx and the dial timeout.
func (n *Notifier) dial(ctx context.Context, vhost string) (*amqp.Connection, error) {
	deadline := time.Now().Add(n.dialTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName("branchkey notifier " + vhost)
	return amqp.DialConfig(n.url, amqp.Config{
		Vhost:      vhost,
		Heartbeat:  10 * time.Second,
		Properties: props,
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Deadline: deadline}
			conn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			// Bounds the AMQP handshake; amqp091 clears it once open.
			if err := conn.SetDeadline(deadline); err != nil {
				conn.Close()
				return nil, err
			}
			return conn, nil
		},
	})
}

// watch logs why the connection closed and tracks whether the broker
// blocks publishers. It ends when the connection closes, by Close or by
// the broker.
func (n *Notifier) watch(vhost string, l *link, closes <-chan *amqp.Error, blocks <-chan amqp.Blocking) {
	defer n.watchers.Done()
	for {
		select {
		case err, ok := <-closes:
			if ok && err != nil {
				n.logger.Warn("RabbitMQ closed the connection; the next publish reconnects", "vhost", vhost, "reason", err)
			}
			return
		case b, ok := <-blocks:
			if !ok {
				blocks = nil
				continue
			}
			if b.Active {
				reason := b.Reason
				l.blocked.Store(&reason)
				n.logger.Warn("RabbitMQ blocks publishing", "vhost", vhost, "reason", reason)
			} else {
				l.blocked.Store(nil)
				n.logger.Info("RabbitMQ unblocked publishing", "vhost", vhost)
			}
		}
	}
}

// openPubChannel opens a publishing channel in confirm mode.
func openPubChannel(conn *amqp.Connection) (*pubChannel, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, err
	}
	if err := ch.Confirm(false); err != nil {
		_ = ch.Close()
		return nil, fmt.Errorf("confirm mode: %w", err)
	}
	return &pubChannel{
		ch:        ch,
		closes:    ch.NotifyClose(make(chan *amqp.Error, 1)),
		exchanges: make(map[string]bool),
	}, nil
}

// closeReason returns why the closed channel closed, if the broker said.
func (p *pubChannel) closeReason() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reason == nil {
		select {
		case e, ok := <-p.closes:
			if ok && e != nil {
				p.reason = e
			}
		default:
		}
	}
	if p.reason == nil {
		return nil
	}
	return p.reason
}

// checkExchange makes sure exchange exists, with a passive declare on a
// channel of its own: publishing to a missing exchange would close the
// shared channel and fail every publish waiting on it.
func checkExchange(conn *amqp.Connection, vhost, exchange string) error {
	ch, err := conn.Channel()
	if err != nil {
		return unavailable(err, "check exchange %q in vhost %q: open a channel", exchange, vhost)
	}
	err = ch.ExchangeDeclarePassive(exchange, amqp.ExchangeFanout, true, false, false, false, nil)
	var aerr *amqp.Error
	switch {
	case err == nil:
		_ = ch.Close()
		return nil
	case errors.As(err, &aerr) && aerr.Code == amqp.NotFound:
		// The broker closed ch.
		return coded(branchkey.ENOTFOUND, err, "exchange %q in vhost %q", exchange, vhost)
	default:
		_ = ch.Close()
		return unavailable(err, "check exchange %q in vhost %q", exchange, vhost)
	}
}
