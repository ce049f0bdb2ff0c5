package postgres

import (
	"context"
	"embed"
	"fmt"

	"github.com/branchkey/branchkey/internal/migration"
	"github.com/jackc/pgx/v5"
)

// migrationFiles holds the schema migrations, named NNNN_what.sql and applied
// in the order of their numbers. A released migration is never edited: a
// change to the schema is a new file.
//
//go:embed migrations/*.sql
var migrationFiles embed.FS

// migrations returns the embedded migrations in order.
func migrations() ([]migration.Migration, error) {
	return migration.Load(migrationFiles, "migrations")
}

// migrate brings the schema up to date in one transaction: either every
// missing migration is applied or none is. The transaction first takes an
// advisory lock named after the schema, so replicas opening a new database at
// once queue up: the first migrates, the others then find the work done.
// (Without the lock, two concurrent CREATE TABLE IF NOT EXISTS can still
// both try to create the table, and one fails on a catalog unique index.)
//
// schema is the schema WithSchema named, created here if missing; "" means
// the connection's current schema, the first of its search_path that exists.
// It also sets the store's advisory lock space.
func (s *Store) migrate(ctx context.Context, schema string) error {
	ms, err := migrations()
	if err != nil {
		return err
	}
	create := schema != ""
	return s.write(ctx, func(tx pgx.Tx) error {
		if !create {
			var current *string
			if err := tx.QueryRow(ctx, "SELECT current_schema()").Scan(&current); err != nil {
				return fmt.Errorf("migrate: read current schema: %w", err)
			}
			if current == nil {
				return fmt.Errorf("migrate: no schema of the search_path exists to create tables in; create one or use WithSchema")
			}
			schema = *current
		}
		if err := tx.QueryRow(ctx, "SELECT hashtext($1)", schema).Scan(&s.lockSpace); err != nil {
			return fmt.Errorf("migrate: %w", err)
		}
		if err := s.lock(ctx, tx, lockMigrate); err != nil {
			return fmt.Errorf("migrate: lock schema %s: %w", schema, err)
		}
		if create {
			if _, err := tx.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+pgx.Identifier{schema}.Sanitize()); err != nil {
				return fmt.Errorf("migrate: create schema %s: %w", schema, err)
			}
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
			version    INTEGER PRIMARY KEY,
			name       TEXT NOT NULL,
			applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
		)`); err != nil {
			return fmt.Errorf("migrate: create schema_migrations: %w", err)
		}
		var current int
		if err := tx.QueryRow(ctx, "SELECT COALESCE(MAX(version), 0) FROM schema_migrations").Scan(&current); err != nil {
			return fmt.Errorf("migrate: read schema version: %w", err)
		}
		if latest := len(ms); current > latest {
			return fmt.Errorf("the database has schema version %d, newer than version %d this build of branchkey knows; run a newer branchkey", current, latest)
		}
		for _, m := range ms[current:] {
			if _, err := tx.Exec(ctx, m.SQL); err != nil {
				return fmt.Errorf("migrate to version %d (%s): %w", m.Version, m.Name, err)
			}
			if _, err := tx.Exec(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.Version, m.Name); err != nil {
				return fmt.Errorf("migrate to version %d (%s): %w", m.Version, m.Name, err)
			}
		}
		return nil
	})
}
