// Package migration reads the versioned schema migrations the SQL stores
// embed: files named NNNN_what.sql, applied in the order of their numbers.
// A released migration is never edited: a change to the schema is a new
// file. Applying them is each store's own business.
package migration

import (
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"
)

// Migration is one schema version's SQL.
type Migration struct {
	Version int
	Name    string
	SQL     string
}

// Load returns the migrations under dir in fsys, in order, checking that
// their versions run 1, 2, 3, ... without gaps.
func Load(fsys fs.FS, dir string) ([]Migration, error) {
	names, err := fs.Glob(fsys, dir+"/*.sql")
	if err != nil {
		return nil, err
	}
	var ms []Migration
	for _, path := range names {
		name := strings.TrimSuffix(strings.TrimPrefix(path, dir+"/"), ".sql")
		num, _, _ := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if err != nil {
			return nil, fmt.Errorf("migration %s: name does not start with a version number", path)
		}
		b, err := fs.ReadFile(fsys, path)
		if err != nil {
			return nil, err
		}
		ms = append(ms, Migration{Version: v, Name: name, SQL: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Version < ms[j].Version })
	for i, m := range ms {
		if m.Version != i+1 {
			return nil, fmt.Errorf("migration %s: expected version %d", m.Name, i+1)
		}
	}
	return ms, nil
}
