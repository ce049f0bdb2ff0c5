package postgres

import (
	"context"

	"github.com/jackc/pgx/v5"

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
	if err := checkText("leaf id", l.ID, "leaf name", l.Name, "tree id", l.TreeID, "branch id", l.BranchID, "password hash", l.PasswordHash); err != nil {
		return err
	}
	created := l.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		// KEY SHARE keeps the branch from being deleted until this commits.
		if _, err := findBranch(ctx, tx, l.TreeID, l.BranchID, "FOR KEY SHARE"); err != nil {
			return err
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM leaves WHERE id = $1", l.ID); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "leaf %q already exists", l.ID)
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM leaves WHERE name = $1", l.Name); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "leaf name %q is taken", l.Name)
		}
		// A leaf created by another process since the checks above makes
		// the insert fail on a unique index; mapError names which.
		_, err := tx.Exec(ctx, "INSERT INTO leaves ("+leafColumns+") VALUES ($1, $2, $3, $4, $5, $6)",
			l.ID, l.TreeID, l.BranchID, l.Name, l.PasswordHash, created)
		return err
	})
	if err != nil {
		return wrap(err, "create leaf %s", l.ID)
	}
	l.CreatedAt = stored(created)
	return nil
}

// FindLeaf returns a leaf by id. ENOTFOUND.
func (s *Store) FindLeaf(ctx context.Context, id string) (*branchkey.Leaf, error) {
	var l *branchkey.Leaf
	err := s.read(ctx, func(q querier) (err error) {
		l, err = findLeaf(ctx, q, id, "")
		return err
	})
	return l, wrap(err, "find leaf %s", id)
}

// findLeaf reads a leaf, with lock appended.
func findLeaf(ctx context.Context, q querier, id, lock string) (*branchkey.Leaf, error) {
	if !storable(id) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found", id)
	}
	ls, err := listLeaves(ctx, q, "WHERE id = $1 "+lock, id)
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
	var ls []*branchkey.Leaf
	err := s.read(ctx, func(q querier) (err error) {
		if storable(name) {
			ls, err = listLeaves(ctx, q, "WHERE name = $1", name)
		}
		return err
	})
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
	var ls []*branchkey.Leaf
	err := s.read(ctx, func(q querier) (err error) {
		if storable(treeID, branchID) {
			ls, err = listLeaves(ctx, q, "WHERE tree_id = $1 AND branch_id = $2 ORDER BY name", treeID, branchID)
		}
		return err
	})
	return ls, wrap(err, "list leaves of branch %s/%s", treeID, branchID)
}

func listLeaves(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Leaf, error) {
	rows, err := q.Query(ctx, "SELECT "+leafColumns+" FROM leaves "+where, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*branchkey.Leaf, error) {
		var l branchkey.Leaf
		if err := row.Scan(&l.ID, &l.TreeID, &l.BranchID, &l.Name, &l.PasswordHash, &l.CreatedAt); err != nil {
			return nil, err
		}
		l.CreatedAt = l.CreatedAt.UTC()
		return &l, nil
	})
}

// DeleteLeaf removes a leaf, its tokens and its updates of open rounds
// (superseded ones too), and returns those updates' blob keys. Its updates in
// closed rounds stay: they are inputs of an aggregation. ENOTFOUND.
func (s *Store) DeleteLeaf(ctx context.Context, id string) (blobs []string, err error) {
	const inOpenRound = `leaf_id = $1 AND EXISTS (SELECT 1 FROM rounds r
		WHERE r.tree_id = updates.tree_id AND r.branch_id = updates.branch_id
		AND r.run = updates.run AND r.round = updates.round AND r.status = 'open')`
	err = s.write(ctx, func(tx pgx.Tx) error {
		l, err := findLeaf(ctx, tx, id, "")
		if err != nil {
			return err
		}
		// The branch's lock keeps an upload or a close of its round from
		// running alongside: an update recorded for a leaf being deleted
		// would never be reported, and a close could pick one deleted here.
		if _, err := findBranch(ctx, tx, l.TreeID, l.BranchID, "FOR NO KEY UPDATE"); err != nil {
			return err
		}
		if _, err := findLeaf(ctx, tx, id, "FOR UPDATE"); err != nil {
			return err
		}
		if blobs, err = scanStrings(tx.Query(ctx,
			"SELECT DISTINCT blob_key FROM updates WHERE "+inOpenRound+" AND blob_key <> '' ORDER BY 1", id)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "DELETE FROM updates WHERE "+inOpenRound, id); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM leaves WHERE id = $1", id)
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
	if err := checkText("password hash", hash); err != nil {
		return err
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		if !storable(id) {
			return branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found", id)
		}
		tag, err := tx.Exec(ctx, "UPDATE leaves SET password_hash = $1 WHERE id = $2", hash, id)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found", id)
		}
		_, err = tx.Exec(ctx, "DELETE FROM tokens WHERE leaf_id = $1", id)
		return err
	})
	return wrap(err, "set password of leaf %s", id)
}
