// Package postgres implements branchkey.Store on PostgreSQL with pgx: the
// metadata store for one or several branchkey server replicas sharing a
// database.
//
// The schema is created and upgraded by versioned migrations embedded in the
// binary and recorded in schema_migrations. Open applies them in one
// transaction under an advisory lock, so replicas starting at once migrate a
// database exactly once; a database migrated by a newer build is refused.
//
// Every guarantee of branchkey.Store holds across processes, not only across
// goroutines: see Store for how rounds close and are claimed exactly once,
// how the outbox is shared by several relays, and why message sequence
// numbers never become visible out of order.
//
// When the server cannot be reached, calls fail with EUNAVAILABLE and the pool
// reconnects by itself once it is back; nothing needs reopening.
package postgres

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/branchkey/branchkey"
)

var _ branchkey.Store = (*Store)(nil)

// Store is a branchkey.Store on a PostgreSQL database. It is safe for
// concurrent use by several goroutines and by several processes sharing the
// database.
//
// Transactions run at READ COMMITTED and take row locks in one order, tree,
// branch, leaf, round, so that two transactions never wait on each other in
// a cycle:
//
//   - Anything that reads a branch's state and then changes it (PutUpdate,
//     CloseRound, SetRunStatus, DeleteLeaf) first locks the branch's row FOR
//     NO KEY UPDATE. That serializes them per branch, like SQLite's single
//     writer does for the whole file, while different branches proceed in
//     parallel. CloseRound therefore succeeds exactly once: a second caller
//     waits for the lock, then sees the branch already at the next round and
//     gets ECONFLICT, and no upload can slip into a round while it closes.
//   - FinishRound, FailRound and ClaimRound lock the branch FOR KEY SHARE
//     (which only a delete conflicts with) and then change the round with a
//     conditional UPDATE: ClaimRound's WHERE clause requires the round to be
//     closed and unclaimed, expired or the caller's own, so of concurrent
//     claimers one updates the row and the others, re-evaluating the
//     condition after waiting, update nothing and get ECONFLICT. A claim
//     whose lease expired is taken over the same way.
//   - DeleteBranch and DeleteTree lock the rows they delete FOR UPDATE
//     before collecting blob keys, so an upload still in flight either
//     finishes first (and its blob is reported) or finds the branch gone.
//   - ClaimOutbox picks messages with FOR UPDATE SKIP LOCKED, so relays on
//     every replica lease disjoint batches at once without waiting on each
//     other; a message leased by another owner is skipped until its lease
//     expires.
//   - DeleteExpiredTokens runs under a transaction-level advisory lock, so
//     concurrent sweeps take turns and each leaf is reported once.
//   - Message inserts hold another transaction-level advisory lock from
//     before their seq is drawn until commit; see insertMessage.
//
// A transaction that fails with a serialization failure, a deadlock or a
// connection error that happened before anything was sent is retried a few
// times, callbacks included: the callbacks PutUpdate, CloseRound and
// SetRunStatus take may run more than once, must not call the Store, and
// should not have side effects beyond their result.
type Store struct {
	pool *pgxpool.Pool
	name string // host:port/database[/schema], for messages; no credentials
	// lockSpace is the second key of every advisory lock the store takes,
	// derived from its schema, so stores in different schemas of one
	// database do not contend for each other's locks.
	lockSpace int32
	closed    atomic.Bool
	now       func() time.Time
}

// Advisory lock classes: the first key of pg_advisory_xact_lock(int, int).
// 0x626b is "bk".
const (
	lockMigrate  int32 = 0x626b0001
	lockMessages int32 = 0x626b0002
	lockTokens   int32 = 0x626b0003
)

// Option configures Open.
type Option func(*options)

type options struct {
	schema     string
	poolConfig func(*pgxpool.Config)
}

// WithSchema keeps branchkey's tables in the named schema instead of the
// first schema of the connection's search_path: Open creates the schema if
// it is missing and sets search_path to it on every connection. Several
// deployments (or tests) can share one database this way.
func WithSchema(name string) Option {
	return func(o *options) { o.schema = name }
}

// WithPoolConfig lets the caller adjust the pool's configuration (its size,
// timeouts, TLS, tracing) after it is parsed from the URL and before the pool
// is created.
func WithPoolConfig(fn func(*pgxpool.Config)) Option {
	return func(o *options) { o.poolConfig = fn }
}

// Open connects to the PostgreSQL database at url (a postgres:// URL or a
// key=value connection string, as pgx reads them, PG* environment variables
// included) and brings its schema up to date. It refuses a database whose
// schema is newer than this build knows. EUNAVAILABLE if the server cannot
// be reached.
func Open(ctx context.Context, url string, opts ...Option) (*Store, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgx redacts the password from its parse errors.
		return nil, fmt.Errorf("open database: %w", err)
	}
	name := fmt.Sprintf("%s:%d/%s", cfg.ConnConfig.Host, cfg.ConnConfig.Port, cfg.ConnConfig.Database)
	if o.schema != "" {
		if strings.IndexByte(o.schema, 0) >= 0 || !utf8.ValidString(o.schema) {
			return nil, fmt.Errorf("open database %s: schema name %q is not valid text", name, o.schema)
		}
		cfg.ConnConfig.RuntimeParams["search_path"] = pgx.Identifier{o.schema}.Sanitize()
		name += "/" + o.schema
	}
	if o.poolConfig != nil {
		o.poolConfig(cfg)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", name, mapError(err))
	}
	s := &Store{pool: pool, name: name, now: func() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }}
	if err := s.migrate(ctx, o.schema); err != nil {
		pool.Close()
		return nil, fmt.Errorf("open database %s: %w", name, mapError(err))
	}
	return s, nil
}

// Name returns the database's host, port, name and schema, without
// credentials, for logs.
func (s *Store) Name() string { return s.name }

// Ping checks that the database answers. EUNAVAILABLE if it does not.
func (s *Store) Ping(ctx context.Context) error {
	err := s.read(ctx, func(q querier) error {
		var one int
		return q.QueryRow(ctx, "SELECT 1").Scan(&one)
	})
	return wrap(err, "ping database %s", s.name)
}

// Close closes the pool's connections, waiting for those in use to be
// returned. Committed writes are already durable.
func (s *Store) Close() error {
	if s.closed.CompareAndSwap(false, true) {
		s.pool.Close()
	}
	return nil
}

// querier is what a pool and a transaction have in common, so finders work
// both inside and outside a transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// maxAttempts is how many times a transaction is tried when it fails in a
// way that is safe to retry.
const maxAttempts = 4

// write runs fn in a transaction and commits it if fn returns nil. A
// transaction that failed in a way worth retrying runs again.
func (s *Store) write(ctx context.Context, fn func(tx pgx.Tx) error) error {
	return s.retry(ctx, func() error { return pgx.BeginFunc(ctx, s.pool, fn) })
}

// read runs fn on the pool, again if it failed before reaching the server.
func (s *Store) read(ctx context.Context, fn func(q querier) error) error {
	return s.retry(ctx, func() error { return fn(s.pool) })
}

// errClosed is returned by every call after Close.
var errClosed = branchkey.Errorf(branchkey.EUNAVAILABLE, "the database is closed")

func (s *Store) retry(ctx context.Context, op func() error) error {
	delay := 5 * time.Millisecond
	for attempt := 1; ; attempt++ {
		if s.closed.Load() {
			return errClosed
		}
		err := op()
		if err == nil || attempt == maxAttempts || ctx.Err() != nil || !retryable(err) {
			return err
		}
		t := time.NewTimer(delay + rand.N(delay))
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		delay *= 4
	}
}

// retryable reports whether a failed transaction can simply run again: the
// database aborted it to resolve a conflict, or the connection failed before
// the statement was sent.
func retryable(err error) bool {
	var cb *callbackError
	if errors.As(err, &cb) {
		return false
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code == "40001" || pe.Code == "40P01"
	}
	return pgconn.SafeToRetry(err)
}

// lock takes a transaction-level advisory lock of the class in this store's
// lock space, held until the transaction ends.
func (s *Store) lock(ctx context.Context, tx pgx.Tx, class int32) error {
	_, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1::int4, $2::int4)", class, s.lockSpace)
	return err
}

// callbackError marks an error returned by a caller's callback, so that it is
// returned as it is instead of wrapped, and never retried.
type callbackError struct{ err error }

func (e *callbackError) Error() string { return e.err.Error() }
func (e *callbackError) Unwrap() error { return e.err }

// wrap adds context to a low-level error and gives it a domain code where one
// applies. Domain errors, which already name the thing, and callback errors
// pass through unchanged.
func wrap(err error, format string, args ...any) error {
	if err == nil {
		return nil
	}
	var cb *callbackError
	if errors.As(err, &cb) {
		return cb.err
	}
	var e *branchkey.Error
	if errors.As(err, &e) {
		return err
	}
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), mapError(err))
}

// mapError gives errors that mean something to a caller a domain code,
// keeping the original error in the chain for the logs.
func mapError(err error) error {
	if err == nil {
		return nil
	}
	var e *branchkey.Error
	if errors.As(err, &e) {
		return err
	}
	code, msg := classify(err)
	if code == "" {
		return err
	}
	return fmt.Errorf("%w: %w", branchkey.Errorf(code, "%s", msg), err)
}

// classify returns the domain code and message for err, or "" if it has
// none and is internal.
func classify(err error) (code, msg string) {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		// The caller gave up; that is not the database's fault.
		return "", ""
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch {
		case pe.Code == "23505":
			// The methods check what they can name first; this is the
			// fallback for a race with another process.
			return branchkey.ECONFLICT, conflictMessage(pe.ConstraintName)
		case pe.Code == "23503":
			return branchkey.ENOTFOUND, "a record it refers to does not exist"
		case pe.Code == "22021" || pe.Code == "22P05":
			return branchkey.EINVALID, "a text value holds a NUL byte or is not valid UTF-8"
		case strings.HasPrefix(pe.Code, "08"), // connection exception
			pe.Code == "57P01", pe.Code == "57P02", pe.Code == "57P03", // shutting down, starting up
			pe.Code == "53300",                     // too many connections
			pe.Code == "40001", pe.Code == "40P01", // contention that outlived the retries
			pe.Code == "55P03": // lock not available
			return branchkey.EUNAVAILABLE, "the database is unavailable or busy; retry later"
		}
		return "", ""
	}
	var ce *pgconn.ConnectError
	var ne net.Error
	if errors.As(err, &ce) || errors.As(err, &ne) || pgconn.SafeToRetry(err) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) {
		return branchkey.EUNAVAILABLE, "the database cannot be reached; retry later"
	}
	return "", ""
}

// conflictMessage names what a unique constraint protects.
func conflictMessage(constraint string) string {
	switch constraint {
	case "trees_pkey":
		return "a tree with that id already exists"
	case "branches_pkey":
		return "a branch with that id already exists in the tree"
	case "leaves_pkey":
		return "a leaf with that id already exists"
	case "leaves_name_key":
		return "a leaf with that name already exists"
	case "tokens_pkey":
		return "a token with that hash already exists"
	case "updates_pkey":
		return "an update with that id already exists"
	case "updates_idempotency":
		return "the leaf already has an update with that idempotency key"
	case "updates_current":
		return "the leaf already has a current update in the round"
	case "aggregations_pkey":
		return "an aggregation with that id already exists"
	case "messages_id_key":
		return "a message with that id already exists"
	}
	return "it conflicts with a stored record"
}

// checkText refuses strings PostgreSQL's text type cannot hold (a NUL byte,
// invalid UTF-8) with a message naming the field. pairs are name, value.
func checkText(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		v := pairs[i+1]
		if strings.IndexByte(v, 0) >= 0 {
			return branchkey.Errorf(branchkey.EINVALID, "%s %q holds a NUL byte", pairs[i], v)
		}
		if !utf8.ValidString(v) {
			return branchkey.Errorf(branchkey.EINVALID, "%s %q is not valid UTF-8", pairs[i], v)
		}
	}
	return nil
}

// storable reports whether every string can be stored; a lookup by a string
// that cannot be stored finds nothing.
func storable(vs ...string) bool {
	for _, v := range vs {
		if strings.IndexByte(v, 0) >= 0 || !utf8.ValidString(v) {
			return false
		}
	}
	return true
}

// nullTime is a nullable timestamptz parameter: NULL when t is zero.
func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

// timeOf reads a nullable timestamptz column: NULL is the zero time.
func timeOf(v pgtype.Timestamptz) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return v.Time.UTC()
}

// stored is t as the database keeps it: UTC, whole microseconds.
func stored(t time.Time) time.Time { return t.UTC().Truncate(time.Microsecond) }

// list is a TEXT[] parameter; nil is the empty array, not NULL.
func list(v []string) []string {
	if v == nil {
		return []string{}
	}
	return v
}

// listOf reads a TEXT[] column; an empty array is nil.
func listOf(v []string) []string {
	if len(v) == 0 {
		return nil
	}
	return v
}

// limitOf is a LIMIT parameter: NULL, no limit, when limit <= 0.
func limitOf(limit int) any {
	if limit <= 0 {
		return nil
	}
	return int64(limit)
}

// scanStrings reads a one-column result.
func scanStrings(rows pgx.Rows, err error) ([]string, error) {
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// exists reports whether a query returns a row.
func exists(ctx context.Context, q querier, query string, args ...any) (bool, error) {
	var one int
	err := q.QueryRow(ctx, query, args...).Scan(&one)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

// jsonText encodes v for a JSON TEXT column.
func jsonText(v any) (string, error) {
	b, err := json.Marshal(v)
	return string(b), err
}

// errNoRows reports whether err is pgx's "no rows".
func errNoRows(err error) bool { return errors.Is(err, pgx.ErrNoRows) }
