// Package service is branchkey's application layer: it logs leaves in and
// out, takes uploads into rounds, decides when a round aggregates, runs the
// aggregation engine, and delivers the resulting messages through the outbox.
// It works on the domain interfaces only (Store, BlobStore, Broker,
// Notifier), so the same code runs on SQLite and files or on PostgreSQL and
// S3, on one node or on several replicas.
//
// Files: auth.go (passwords, tokens, login), admin.go (trees, branches,
// leaves, runs), upload.go (validation and recording), rounds.go (triggers,
// claims, aggregation, recovery), relay.go (the outbox relay), hub.go (the
// in-process notifier behind Server-Sent Events).
package service

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/branchkey/branchkey"
)

// Config tunes a Service. The zero value of each field means its default.
type Config struct {
	// TokenTTL is how long an access token lives. Default 24h.
	TokenTTL time.Duration
	// MaxUploadBytes bounds an upload's file. Default 4 GiB.
	MaxUploadBytes int64
	// ClaimLease is how long a replica holds a round it aggregates before
	// another may take it over; the holder renews it while it works.
	// Default 1m.
	ClaimLease time.Duration
	// PollInterval is how often background loops look for due rounds,
	// abandoned claims, unsent messages and other replicas' messages.
	// Default 1s.
	PollInterval time.Duration
	// Owner names this replica in claims and leases. Default: host, pid
	// and a random suffix.
	Owner string
	// Now returns the current time; tests set it. Default time.Now.
	Now func() time.Time
}

func (c *Config) setDefaults() {
	if c.TokenTTL <= 0 {
		c.TokenTTL = 24 * time.Hour
	}
	if c.MaxUploadBytes <= 0 {
		c.MaxUploadBytes = 4 << 30
	}
	if c.ClaimLease <= 0 {
		c.ClaimLease = time.Minute
	}
	if c.PollInterval <= 0 {
		c.PollInterval = time.Second
	}
	if c.Owner == "" {
		host, _ := os.Hostname()
		c.Owner = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), randomHex(4))
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Service implements branchkey's operations on top of the domain
// interfaces. Create it with New, start its background loops with Run, and
// stop them by cancelling Run's context.
type Service struct {
	cfg       Config
	store     branchkey.Store
	blobs     branchkey.BlobStore
	broker    branchkey.Broker     // nil without a broker
	notifiers []branchkey.Notifier // external transports the relay feeds
	log       *slog.Logger

	hub    *Hub
	relayC chan struct{}
	hashes chan struct{} // bounds concurrent password hashing

	mu   sync.Mutex
	accs map[branchkey.RoundKey]*roundAcc
	// aggregating holds the rounds this process is aggregating, so a
	// round is never worked on twice here at once.
	aggregating map[branchkey.RoundKey]bool
	aggWG       sync.WaitGroup
	closing     bool
}

// Option configures optional parts of a Service.
type Option func(*Service)

// WithBroker provisions leaves on a message broker at login and tears their
// broker side down on logout and deletion.
func WithBroker(b branchkey.Broker) Option { return func(s *Service) { s.broker = b } }

// WithNotifier adds a transport the outbox relay publishes every message
// to (RabbitMQ). A message counts as sent once every transport took it.
// Without any, messages reach leaves through the Hub (SSE) only.
func WithNotifier(n branchkey.Notifier) Option {
	return func(s *Service) { s.notifiers = append(s.notifiers, n) }
}

// New returns a Service over a store and a blob store.
func New(store branchkey.Store, blobs branchkey.BlobStore, cfg Config, log *slog.Logger, opts ...Option) *Service {
	cfg.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Service{
		cfg:         cfg,
		store:       store,
		blobs:       blobs,
		log:         log.WithGroup("service"),
		relayC:      make(chan struct{}, 1),
		hashes:      make(chan struct{}, 4),
		accs:        map[branchkey.RoundKey]*roundAcc{},
		aggregating: map[branchkey.RoundKey]bool{},
	}
	for _, o := range opts {
		o(s)
	}
	s.hub = newHub(store, s.log)
	return s
}

// Hub returns the in-process notifier that SSE subscribers wait on.
func (s *Service) Hub() *Hub { return s.hub }

// Store returns the metadata store.
func (s *Service) Store() branchkey.Store { return s.store }

// Config returns the effective configuration.
func (s *Service) Config() Config { return s.cfg }

// Run runs the background loops until ctx is cancelled: round deadlines
// and recovery, the outbox relay, token expiry and the hub's watch for
// other replicas' messages. It returns after every aggregation it started
// has finished or been abandoned.
func (s *Service) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	loops := []func(context.Context){s.roundsLoop, s.relayLoop, s.tokensLoop, s.hub.watch(s.cfg.PollInterval)}
	for _, loop := range loops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			loop(ctx)
		}()
	}
	wg.Wait()
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.aggWG.Wait()
	return nil
}

// Ready reports whether the service can serve: the store answers.
func (s *Service) Ready(ctx context.Context) error {
	return s.store.Ping(ctx)
}

// now returns the current time in UTC.
func (s *Service) now() time.Time { return s.cfg.Now().UTC() }

// every runs fn every interval, and once at once, until ctx is done.
func every(ctx context.Context, interval time.Duration, wake <-chan struct{}, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		fn()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-wake:
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return hex.EncodeToString(b)
}

// isCode reports whether err carries the domain error code (never true
// for EINTERNAL, which any error that is not a domain error maps to).
func isCode(err error, code string) bool {
	return code != branchkey.EINTERNAL && branchkey.ErrorCode(err) == code
}
