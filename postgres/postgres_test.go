package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/postgres"
	"github.com/branchkey/branchkey/storetest"
)

// testURL returns the server named by BRANCHKEY_TEST_POSTGRES_URL, and skips
// the test when it is unset.
func testURL(tb testing.TB) string {
	tb.Helper()
	u := os.Getenv("BRANCHKEY_TEST_POSTGRES_URL")
	if u == "" {
		tb.Skip("BRANCHKEY_TEST_POSTGRES_URL names no PostgreSQL server")
	}
	return u
}

// MustSchema returns the name of a schema no other test uses, and drops it,
// with everything in it, when the test ends.
func MustSchema(tb testing.TB) string {
	tb.Helper()
	url := testURL(tb)
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		tb.Fatal(err)
	}
	name := "bktest_" + hex.EncodeToString(b[:])
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, url)
		if err != nil {
			tb.Errorf("drop schema %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE"); err != nil {
			tb.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// MustOpenIn opens a Store in schema and closes it when the test ends.
func MustOpenIn(tb testing.TB, schema string, opts ...postgres.Option) *postgres.Store {
	tb.Helper()
	s, err := postgres.Open(context.Background(), testURL(tb), append([]postgres.Option{postgres.WithSchema(schema)}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

// MustOpen opens a Store in a fresh schema of its own.
func MustOpen(tb testing.TB) *postgres.Store {
	tb.Helper()
	return MustOpenIn(tb, MustSchema(tb))
}

// mustExec runs sql on a connection of its own, with search_path set to
// schema.
func mustExec(tb testing.TB, schema, sql string, args ...any) {
	tb.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testURL(tb))
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "SET search_path TO "+pgx.Identifier{schema}.Sanitize()); err != nil {
		tb.Fatal(err)
	}
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		tb.Fatal(err)
	}
}

// schemaVersions reads schema_migrations with a connection of its own.
func schemaVersions(tb testing.TB, schema string) []int {
	tb.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, testURL(tb))
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SELECT version FROM "+pgx.Identifier{schema, "schema_migrations"}.Sanitize()+" ORDER BY version")
	if err != nil {
		tb.Fatal(err)
	}
	vs, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		tb.Fatal(err)
	}
	return vs
}

func TestStore(t *testing.T) {
	url := testURL(t)
	storetest.Run(t, func(tb testing.TB) branchkey.Store {
		// storetest closes the store itself, before the schema is dropped.
		schema := MustSchema(tb)
		s, err := postgres.Open(context.Background(), url, postgres.WithSchema(schema))
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
	schema := MustSchema(t)
	s := MustOpenIn(t, schema)
	if err := s.CreateTree(ctx, &branchkey.Tree{ID: "t1"}); err != nil {
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
		s := MustOpenIn(t, schema)
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
	checkVersions(t, schemaVersions(t, schema))
}

// checkVersions checks that schema_migrations holds 1, 2, ... once each.
func checkVersions(t *testing.T, vs []int) {
	t.Helper()
	if len(vs) == 0 {
		t.Fatal("schema_migrations is empty")
	}
	for i, v := range vs {
		if v != i+1 {
			t.Fatalf("schema_migrations = %v, want 1, 2, ... once each", vs)
		}
	}
}

// TestOpenConcurrently pins that replicas opening a new database at once
// migrate it once, without an error: the first creates the schema and the
// tables, the others wait for it and find the work done.
func TestOpenConcurrently(t *testing.T) {
	url := testURL(t)
	schema := MustSchema(t)
	const n = 3
	stores := make([]*postgres.Store, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			stores[i], errs[i] = postgres.Open(context.Background(), url, postgres.WithSchema(schema))
		})
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		defer stores[i].Close()
	}
	checkVersions(t, schemaVersions(t, schema))
	// Each store works on the shared tables.
	for i, s := range stores {
		if err := s.CreateTree(context.Background(), &branchkey.Tree{ID: fmt.Sprint("t", i)}); err != nil {
			t.Fatal(err)
		}
	}
	trees, err := stores[0].ListTrees(context.Background())
	if err != nil || len(trees) != n {
		t.Fatalf("ListTrees = %d trees, %v; want %d", len(trees), err, n)
	}
}

// TestNewerSchemaRefused pins that a build never runs on a schema it does
// not know, which it could corrupt.
func TestNewerSchemaRefused(t *testing.T) {
	schema := MustSchema(t)
	if err := MustOpenIn(t, schema).Close(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, schema, "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
	s, err := postgres.Open(context.Background(), testURL(t), postgres.WithSchema(schema))
	if err == nil {
		s.Close()
		t.Fatal("opened a database with a newer schema")
	}
	if !strings.Contains(err.Error(), "schema version 999") {
		t.Fatalf("error %q does not name the schema version", err)
	}
}

// TestSearchPathSchema pins that without WithSchema the tables go to the
// connection's current schema, here one named in the URL's search_path.
func TestSearchPathSchema(t *testing.T) {
	url := testURL(t)
	schema := MustSchema(t)
	mustExec(t, "public", "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
	sep := "?"
	if strings.Contains(url, "?") {
		sep = "&"
	}
	s, err := postgres.Open(context.Background(), url+sep+"search_path="+schema)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	checkVersions(t, schemaVersions(t, schema))
}

// TestErrorMessages pins that conflicts and missing rows name the thing.
func TestErrorMessages(t *testing.T) {
	ctx := context.Background()
	s := MustOpen(t)
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
	_, errNulFind := s.FindTree(ctx, "a\x00b")
	tests := []struct {
		name string
		err  error
		code string
		msg  string
	}{
		{"TreeExists", s.CreateTree(ctx, &branchkey.Tree{ID: "t1"}), branchkey.ECONFLICT, `tree "t1" already exists`},
		{"BranchExists", s.CreateBranch(ctx, &branchkey.Branch{TreeID: "t1", ID: "b1", RunStatus: branchkey.RunStarted}), branchkey.ECONFLICT, `branch "b1" already exists in tree "t1"`},
		{"LeafNameTaken", s.CreateLeaf(ctx, &branchkey.Leaf{ID: "l2", TreeID: "t1", BranchID: "b1", Name: "alice"}), branchkey.ECONFLICT, `leaf name "alice" is taken`},
		{"UpdateNotFound", errNoUpdate, branchkey.ENOTFOUND, `update "u9" not found`},
		{"BranchNotFound", errNoBranch, branchkey.ENOTFOUND, `branch "b9" not found in tree "t1"`},
		{"NULInID", s.CreateTree(ctx, &branchkey.Tree{ID: "a\x00b"}), branchkey.EINVALID, `tree id "a\x00b" holds a NUL byte`},
		{"BadUTF8", s.CreateLeaf(ctx, &branchkey.Leaf{ID: "l3", TreeID: "t1", BranchID: "b1", Name: "\xff"}), branchkey.EINVALID, `leaf name "\xff" is not valid UTF-8`},
		{"NULLookup", errNulFind, branchkey.ENOTFOUND, `tree "a\x00b" not found`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if branchkey.ErrorCode(tt.err) != tt.code || branchkey.ErrorMessage(tt.err) != tt.msg {
				t.Fatalf("error %v, want code %s and message %q", tt.err, tt.code, tt.msg)
			}
		})
	}
}

// TestByteOrder pins that lists come in Go's string order, byte by byte,
// whatever the database's collation would say.
func TestByteOrder(t *testing.T) {
	ctx := context.Background()
	s := MustOpen(t)
	ids := []string{"b", "B", "a", "_x", "Z", "é", "a-1", "a1", "A"}
	for _, id := range ids {
		if err := s.CreateTree(ctx, &branchkey.Tree{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	trees, err := s.ListTrees(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, tr := range trees {
		got = append(got, tr.ID)
	}
	want := slices.Clone(ids)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("ListTrees order = %q, want %q", got, want)
	}
}

// TestTimesMicroseconds pins what the database keeps of a time: the instant,
// to the microsecond, returned in UTC; the Store reports what it stored.
func TestTimesMicroseconds(t *testing.T) {
	ctx := context.Background()
	s := MustOpen(t)
	at := time.Date(2030, 1, 2, 3, 4, 5, 678901999, time.FixedZone("x", -7*3600))
	tr := &branchkey.Tree{ID: "t1", CreatedAt: at}
	if err := s.CreateTree(ctx, tr); err != nil {
		t.Fatal(err)
	}
	want := time.Date(2030, 1, 2, 10, 4, 5, 678901000, time.UTC)
	if tr.CreatedAt != want {
		t.Fatalf("CreateTree set CreatedAt = %v, want %v", tr.CreatedAt, want)
	}
	got, err := s.FindTree(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	if got.CreatedAt != want {
		t.Fatalf("CreatedAt = %v, want %v", got.CreatedAt, want)
	}
}

// TestClosed pins that a closed Store answers EUNAVAILABLE, not a panic or
// an internal error.
func TestClosed(t *testing.T) {
	s := MustOpen(t)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := s.ListTrees(context.Background()); branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("ListTrees after Close = %v, want EUNAVAILABLE", err)
	}
}

// TestUnreachable pins that a server nobody listens for is EUNAVAILABLE,
// so that the caller knows to retry.
func TestUnreachable(t *testing.T) {
	testURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := postgres.Open(ctx, "postgres://postgres@127.0.0.1:1/test?sslmode=disable&connect_timeout=5")
	if branchkey.ErrorCode(err) != branchkey.EUNAVAILABLE {
		t.Fatalf("Open of a closed port = %v (code %s), want EUNAVAILABLE", err, branchkey.ErrorCode(err))
	}
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Open of a closed port waited for the deadline: %v", err)
	}
}
