package sqlite_test

import (
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
