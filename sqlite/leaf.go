package sqlite

import (
	"context"
	"database/sql"

	"github.com/branchkey/branchkey"
)

// leafColumns are the columns listLeaves reads, in order.
const leafColumns = "id, tree_id, branch_id, name, password_hash, created_at"

// CreateLeaf records a leaf, setting CreatedAt if it is zero. ENOTFOUND for
// the branch, ECONFLICT if the id or the name is taken.
func (s *Store) CreateLeaf(ctx context.Context, l *branchkey.Leaf) error {
	if l.ID == "" || l.Name == "" {
		return branchkey.Errorf(branchkey.EINVALID, "leaf id and name must not be empty")
	}
	created := l.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findBranch(ctx, tx, l.TreeID, l.BranchID); err != nil {
			return err
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM leaves WHERE id = ?", l.ID); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "leaf %q already exists", l.ID)
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM leaves WHERE name = ?", l.Name); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "leaf name %q is taken", l.Name)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO leaves ("+leafColumns+") VALUES (?, ?, ?, ?, ?, ?)",
			l.ID, l.TreeID, l.BranchID, l.Name, l.PasswordHash, fmtTime(created))
		return err
	})
	if err != nil {
		return wrap(err, "create leaf %s", l.ID)
	}
	l.CreatedAt = created.UTC()
	return nil
}

// FindLeaf returns a leaf by id. ENOTFOUND.
func (s *Store) FindLeaf(ctx context.Context, id string) (*branchkey.Leaf, error) {
	l, err := findLeaf(ctx, s.rdb, id)
	return l, wrap(err, "find leaf %s", id)
}

func findLeaf(ctx context.Context, q querier, id string) (*branchkey.Leaf, error) {
	ls, err := listLeaves(ctx, q, "WHERE id = ?", id)
	if err != nil {
		return nil, err
	}
	if len(ls) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found", id)
	}
	return ls[0], nil
}

// FindLeafByName returns a leaf by login name. ENOTFOUND.
func (s *Store) FindLeafByName(ctx context.Context, name string) (*branchkey.Leaf, error) {
	ls, err := listLeaves(ctx, s.rdb, "WHERE name = ?", name)
	if err != nil {
		return nil, wrap(err, "find leaf named %s", name)
	}
	if len(ls) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "leaf named %q not found", name)
	}
	return ls[0], nil
}

// ListLeaves returns a branch's leaves, by name.
func (s *Store) ListLeaves(ctx context.Context, treeID, branchID string) ([]*branchkey.Leaf, error) {
	ls, err := listLeaves(ctx, s.rdb, "WHERE tree_id = ? AND branch_id = ?", treeID, branchID)
	return ls, wrap(err, "list leaves of branch %s/%s", treeID, branchID)
}

func listLeaves(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Leaf, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+leafColumns+" FROM leaves "+where+" ORDER BY name", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Leaf
	for rows.Next() {
		var l branchkey.Leaf
		var created sql.NullString
		if err := rows.Scan(&l.ID, &l.TreeID, &l.BranchID, &l.Name, &l.PasswordHash, &created); err != nil {
			return nil, err
		}
		if l.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, &l)
	}
	return out, rows.Err()
}

// DeleteLeaf removes a leaf, its tokens and its updates of open rounds
// (superseded ones too), and returns those updates' blob keys. Its updates in
// closed rounds stay: they are inputs of an aggregation. ENOTFOUND.
func (s *Store) DeleteLeaf(ctx context.Context, id string) (blobs []string, err error) {
	const inOpenRound = `leaf_id = ? AND EXISTS (SELECT 1 FROM rounds r
		WHERE r.tree_id = updates.tree_id AND r.branch_id = updates.branch_id
		AND r.run = updates.run AND r.round = updates.round AND r.status = 'open')`
	err = s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findLeaf(ctx, tx, id); err != nil {
			return err
		}
		if blobs, err = scanStrings(tx.QueryContext(ctx,
			"SELECT DISTINCT blob_key FROM updates WHERE "+inOpenRound+" AND blob_key <> '' ORDER BY 1", id)); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "DELETE FROM updates WHERE "+inOpenRound, id); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "DELETE FROM leaves WHERE id = ?", id)
		return err
	})
	if err != nil {
		return nil, wrap(err, "delete leaf %s", id)
	}
	return blobs, nil
}

// SetLeafPassword replaces a leaf's password hash and revokes its tokens.
// ENOTFOUND.
func (s *Store) SetLeafPassword(ctx context.Context, id, hash string) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, "UPDATE leaves SET password_hash = ? WHERE id = ?", hash, id)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found", id)
		}
		_, err = tx.ExecContext(ctx, "DELETE FROM tokens WHERE leaf_id = ?", id)
		return err
	})
	return wrap(err, "set password of leaf %s", id)
}
