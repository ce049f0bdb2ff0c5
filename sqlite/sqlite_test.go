package sqlite_test

import (
	"database/sql"
	"fmt"
	"strings"
	"sync"
	"time"

	"context"
	"path/filepath"
	"testing"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/sqlite"
	"github.com/branchkey/branchkey/storetest"
)

// MustOpen opens a fresh database in a temporary directory and closes it
// when the test ends.
func MustOpen(tb testing.TB) *sqlite.Store {
	tb.Helper()
	return mustOpenPath(tb, filepath.Join(tb.TempDir(), "branchkey.db"))
}

func mustOpenPath(tb testing.TB, path string) *sqlite.Store {
	tb.Helper()
	s, err := sqlite.Open(context.Background(), path)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func TestStore(t *testing.T) {
	storetest.Run(t, func(tb testing.TB) branchkey.Store {
		// storetest closes the store itself.
		s, err := sqlite.Open(context.Background(), filepath.Join(tb.TempDir(), "branchkey.db"))
		if err != nil {
			tb.Fatal(err)
		}
		return s
	})
}

// TestReopenKeepsData pins that data outlives the Store and that opening an
// up-to-date database again migrates nothing.
func TestReopenKeepsData(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "branchkey.db")
	s := mustOpenPath(t, path)
	tr := &branchkey.Tree{ID: "t1"}
	if err := s.CreateTree(ctx, tr); err != nil {
		t.Fatal(err)
	}
	b := &branchkey.Branch{TreeID: "t1", ID: "b1", RunStatus: branchkey.RunStarted,
		Policy: branchkey.Policy{MinUpdates: 2, Strategy: "fedavg", StrategyOptions: map[string]string{"trim": "0.1"}}}
	if err := s.CreateBranch(ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	for range 2 {
		s = mustOpenPath(t, path)
		got, err := s.FindBranch(ctx, "t1", "b1")
		if err != nil {
			t.Fatal(err)
		}
		if got.Policy.StrategyOptions["trim"] != "0.1" || got.Round != 1 {
			t.Fatalf("reopened branch = %+v", got)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
	}

	versions := schemaVersions(t, path)
	if len(versions) == 0 || versions[0] != 1 {
		t.Fatalf("schema_migrations = %v, want 1, 2, ... once each", versions)
	}
	for i, v := range versions {
		if v != i+1 {
			t.Fatalf("schema_migrations = %v, want each version once, in order", versions)
		}
	}
}

// schemaVersions reads schema_migrations with a connection of its own.
func schemaVersions(t *testing.T, path string) []int {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	rows, err := db.Query("SELECT version FROM schema_migrations ORDER BY version")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var vs []int
	for rows.Next() {
		var v int
		if err := rows.Scan(&v); err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return vs
}

// TestNewerSchemaRefused pins that a build never runs on a schema it does
// not know, which it could corrupt.
func TestNewerSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "branchkey.db")
	if err := mustOpenPath(t, path).Close(); err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec("INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', '')"); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := sqlite.Open(context.Background(), path)
	if err == nil {
		s.Close()
		t.Fatal("opened a database with a newer schema")
	}
	if !strings.Contains(err.Error(), "schema version 999") {
		t.Fatalf("error %q does not name the schema version", err)
	}
}

// TestOpenConcurrently pins that processes opening a new database at once
// migrate it once, without a busy error.
func TestOpenConcurrently(t *testing.T) {
	path := filepath.Join(t.TempDir(), "branchkey.db")
	const n = 6
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			s, err := sqlite.Open(context.Background(), path)
			if err == nil {
				err = s.Close()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
	}
	if vs := schemaVersions(t, path); len(vs) == 0 || vs[len(vs)-1] != len(vs) {
		t.Fatalf("schema_migrations = %v", vs)
	}
}

// TestConcurrentWriters runs many goroutines writing through two Stores on
// one file, as two server processes would: no write may fail with a busy
// error, and every write must land.
func TestConcurrentWriters(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "branchkey.db")
	s1 := mustOpenPath(t, path)
	defer s1.Close()
	s2 := mustOpenPath(t, path)
	defer s2.Close()
	stores := []*sqlite.Store{s1, s2}

	if err := s1.CreateTree(ctx, &branchkey.Tree{ID: "t"}); err != nil {
		t.Fatal(err)
	}
	if err := s1.CreateBranch(ctx, &branchkey.Branch{TreeID: "t", ID: "b", RunStatus: branchkey.RunStarted, Policy: branchkey.Policy{MinUpdates: 1000}}); err != nil {
		t.Fatal(err)
	}
	const writers, each = 24, 15
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Go(func() {
			s := stores[w%2]
			leaf := &branchkey.Leaf{ID: fmt.Sprintf("l%d", w), TreeID: "t", BranchID: "b", Name: fmt.Sprintf("leaf-%d", w)}
			if err := s.CreateLeaf(ctx, leaf); err != nil {
				errs <- err
				return
			}
			for i := range each {
				u := &branchkey.Update{ID: fmt.Sprintf("u%d-%d", w, i), TreeID: "t", BranchID: "b", LeafID: leaf.ID, Signature: "s"}
				if _, err := s.PutUpdate(ctx, u, nil); err != nil {
					errs <- err
				}
				if _, err := s.FindRound(ctx, branchkey.RoundKey{TreeID: "t", BranchID: "b", Run: 1, Round: 1}); err != nil {
					errs <- err
				}
				tok := &branchkey.Token{Hash: fmt.Sprintf("h%d-%d", w, i), LeafID: leaf.ID, ExpiresAt: time.Now().Add(-time.Minute)}
				if err := s.CreateToken(ctx, tok); err != nil {
					errs <- err
				}
				if _, err := s.DeleteExpiredTokens(ctx, time.Now()); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("%v (code %s)", err, branchkey.ErrorCode(err))
	}
	r, err := s2.FindRound(ctx, branchkey.RoundKey{TreeID: "t", BranchID: "b", Run: 1, Round: 1})
	if err != nil {
		t.Fatal(err)
	}
	if r.Count != writers {
		t.Fatalf("round Count = %d, want %d", r.Count, writers)
	}
}

// TestErrorMessages pins that conflicts and missing rows name the thing.
func TestErrorMessages(t *testing.T) {
	ctx := context.Background()
	s := MustOpen(t)
	defer s.Close()
	if err := s.CreateTree(ctx, &branchkey.Tree{ID: "t1"}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateBranch(ctx, &branchkey.Branch{TreeID: "t1", ID: "b1", RunStatus: branchkey.RunStarted}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateLeaf(ctx, &branchkey.Leaf{ID: "l1", TreeID: "t1", BranchID: "b1", Name: "alice"}); err != nil {
		t.Fatal(err)
	}
	_, errNoUpdate := s.FindUpdate(ctx, "u9")
	_, errNoBranch := s.FindBranch(ctx, "t1", "b9")
	tests := []struct {
		name string
		err  error
		code string
		msg  string
	}{
		{"TreeExists", s.CreateTree(ctx, &branchkey.Tree{ID: "t1"}), branchkey.ECONFLICT, `tree "t1" already exists`},
		{"LeafNameTaken", s.CreateLeaf(ctx, &branchkey.Leaf{ID: "l2", TreeID: "t1", BranchID: "b1", Name: "alice"}), branchkey.ECONFLICT, `leaf name "alice" is taken`},
		{"UpdateNotFound", errNoUpdate, branchkey.ENOTFOUND, `update "u9" not found`},
		{"BranchNotFound", errNoBranch, branchkey.ENOTFOUND, `branch "b9" not found in tree "t1"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if branchkey.ErrorCode(tt.err) != tt.code || branchkey.ErrorMessage(tt.err) != tt.msg {
				t.Fatalf("error %v, want code %s and message %q", tt.err, tt.code, tt.msg)
			}
		})
	}
}

// TestTimesStoredUTC pins the on-disk time format: UTC, fixed width,
// nanoseconds, so SQL can compare times as strings.
func TestTimesStoredUTC(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "branchkey.db")
	s := mustOpenPath(t, path)
	at := time.Date(2030, 1, 2, 3, 4, 5, 6, time.FixedZone("x", -7*3600))
	if err := s.CreateTree(ctx, &branchkey.Tree{ID: "t1", CreatedAt: at}); err != nil {
		t.Fatal(err)
	}
	got, err := s.FindTree(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	if !got.CreatedAt.Equal(at) || got.CreatedAt.Location() != time.UTC {
		t.Fatalf("CreatedAt = %v, want %v in UTC", got.CreatedAt, at)
	}
	s.Close()

	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var raw string
	if err := db.QueryRow("SELECT created_at FROM trees WHERE id = 't1'").Scan(&raw); err != nil {
		t.Fatal(err)
	}
	if raw != "2030-01-02T10:04:05.000000006Z" {
		t.Fatalf("stored created_at = %q", raw)
	}
}
