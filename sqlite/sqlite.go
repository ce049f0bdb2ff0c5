// Package sqlite implements branchkey.Store on an embedded SQLite database
// (modernc.org/sqlite, pure Go): the default metadata store of a single
// branchkey server.
//
// The database runs in WAL mode with synchronous=FULL, so a committed write
// survives a crash of the process or of the machine. Its schema is created and
// upgraded by versioned migrations when it is opened.
package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"time"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/branchkey/branchkey"
)

var _ branchkey.Store = (*Store)(nil)

// busyTimeout is how long a connection waits for a lock another process
// holds (a second server on the same file, an operator's sqlite3 shell)
// before giving up with EUNAVAILABLE. Within this process writers never wait
// on SQLite's lock: see Store.
const busyTimeout = 10 * time.Second

// Store is a branchkey.Store on a SQLite database file. It is safe for
// concurrent use.
//
// Writes are serialized on one connection, and reads go to a separate pool.
// SQLite allows one writer at a time whatever the number of connections; with
// several write connections, concurrent writers would contend for the file
// lock by polling under busy_timeout, which is unfair, wastes CPU and can
// still end in SQLITE_BUSY under load. One write connection instead makes
// goroutines queue in database/sql's pool, in order, honouring their
// contexts, and never see SQLITE_BUSY from each other. WAL mode lets the
// read pool run alongside the writer, each read seeing the last committed
// state. Write transactions still BEGIN IMMEDIATE (the _txlock DSN option), so
// that a writer in another process cannot turn a read lock into a deadlock;
// busy_timeout covers that case.
//
// The callbacks PutUpdate, CloseRound and SetRunStatus take run inside the
// write transaction: they must not call the Store's write methods, which
// would wait for the connection they hold.
type Store struct {
	path string
	db   *sql.DB // the write connection
	rdb  *sql.DB // the read pool
	now  func() time.Time
}

// Open opens the SQLite database at path, creating it if needed, and brings
// its schema up to date. It refuses a database whose schema is newer than
// this build knows.
func Open(ctx context.Context, path string) (*Store, error) {
	if path == "" || strings.ContainsAny(path, "?#") {
		return nil, fmt.Errorf("open database %q: the path must be non-empty and hold no '?' or '#'", path)
	}
	timeout := fmt.Sprint(busyTimeout.Milliseconds())
	db, err := sql.Open("sqlite", path+"?_txlock=immediate&_journal_mode=WAL&_synchronous=FULL&_foreign_keys=1&_busy_timeout="+timeout)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	if err := migrate(ctx, db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open database %s: %w", path, mapError(err))
	}

	// Readers open the file only after the writer has made it a WAL
	// database. query_only guards against a write slipping onto a reader.
	rdb, err := sql.Open("sqlite", path+"?_query_only=1&_foreign_keys=1&_busy_timeout="+timeout)
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	rdb.SetMaxOpenConns(max(4, 2*runtime.NumCPU()))
	rdb.SetMaxIdleConns(max(4, 2*runtime.NumCPU()))
	s := &Store{path: path, db: db, rdb: rdb, now: func() time.Time { return time.Now().UTC() }}
	if err := s.Ping(ctx); err != nil {
		_ = s.Close()
		return nil, err
	}
	return s, nil
}

// Path returns the database file's path.
func (s *Store) Path() string { return s.path }

// Ping checks that the database answers, on both the write connection and
// the read pool. EUNAVAILABLE if it does not.
func (s *Store) Ping(ctx context.Context) error {
	for _, db := range []*sql.DB{s.db, s.rdb} {
		var one int
		if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
			return wrap(err, "ping database %s", s.path)
		}
	}
	return nil
}

// Close closes the database. Pending writes are already durable.
func (s *Store) Close() error {
	err := errors.Join(s.rdb.Close(), s.db.Close())
	if err != nil {
		return fmt.Errorf("close database %s: %w", s.path, err)
	}
	return nil
}

// querier is what *sql.DB and *sql.Tx have in common, so finders work both
// inside and outside a transaction.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// write runs fn in a write transaction on the write connection and commits
// it if fn returns nil.
func (s *Store) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// callbackError marks an error returned by a caller's callback, so that it is
// returned as it is instead of wrapped.
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

// mapError gives SQLite errors that mean something to a caller a domain code,
// keeping the original error in the chain for the logs.
func mapError(err error) error {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		if errors.Is(err, sql.ErrConnDone) {
			return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.EUNAVAILABLE, "the database is closed"), err)
		}
		return err
	}
	switch se.Code() & 0xff {
	case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED:
		return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.EUNAVAILABLE, "the database is busy"), err)
	case sqlite3.SQLITE_CANTOPEN:
		return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.EUNAVAILABLE, "the database cannot be opened"), err)
	case sqlite3.SQLITE_CONSTRAINT:
		// The methods check what they can name first; this is the
		// fallback for a race with another process.
		if se.Code() == sqlite3.SQLITE_CONSTRAINT_FOREIGNKEY {
			return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.ENOTFOUND, "a record it refers to does not exist"), err)
		}
		return fmt.Errorf("%w: %w", branchkey.Errorf(branchkey.ECONFLICT, "it conflicts with a stored record"), err)
	}
	return err
}

// timeLayout stores times in UTC with nanoseconds and a fixed width, so that
// SQL compares them correctly as strings.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// fmtTime formats t for a NOT NULL column.
func fmtTime(t time.Time) string { return t.UTC().Format(timeLayout) }

// nullTime formats t for a nullable column: NULL when t is zero.
func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return fmtTime(t)
}

// parseTime reads a time column; NULL or "" is the zero time.
func parseTime(s sql.NullString) (time.Time, error) {
	if !s.Valid || s.String == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(timeLayout, s.String)
	if err != nil {
		return time.Time{}, fmt.Errorf("parse time %q: %w", s.String, err)
	}
	return t, nil
}

// jsonList encodes a list for a JSON column; nil is "[]".
func jsonList(v []string) (string, error) {
	if v == nil {
		v = []string{}
	}
	b, err := json.Marshal(v)
	return string(b), err
}

// parseList decodes a JSON list column; an empty list is nil.
func parseList(s string) ([]string, error) {
	var v []string
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		return nil, fmt.Errorf("parse list %q: %w", s, err)
	}
	if len(v) == 0 {
		return nil, nil
	}
	return v, nil
}

// placeholders returns "?, ?, ..." for n arguments.
func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

// chunk splits ids into slices short enough to bind as parameters.
func chunk(ids []string) [][]string {
	const size = 500
	var out [][]string
	for len(ids) > size {
		out = append(out, ids[:size])
		ids = ids[size:]
	}
	if len(ids) > 0 {
		out = append(out, ids)
	}
	return out
}

// scanStrings reads a one-column result.
func scanStrings(rows *sql.Rows, err error) ([]string, error) {
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// exists reports whether a query returns a row.
func exists(ctx context.Context, q querier, query string, args ...any) (bool, error) {
	var one int
	err := q.QueryRowContext(ctx, query, args...).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}
