package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"time"

	"github.com/branchkey/branchkey"
)

// CreateTree records a tree, setting CreatedAt if it is zero. ECONFLICT if
// the id exists.
func (s *Store) CreateTree(ctx context.Context, t *branchkey.Tree) error {
	if t.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "tree id is empty")
	}
	created := t.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		if ok, err := exists(ctx, tx, "SELECT 1 FROM trees WHERE id = ?", t.ID); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "tree %q already exists", t.ID)
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO trees (id, created_at) VALUES (?, ?)", t.ID, fmtTime(created))
		return err
	})
	if err != nil {
		return wrap(err, "create tree %s", t.ID)
	}
	t.CreatedAt = created.UTC()
	return nil
}

// FindTree returns a tree. ENOTFOUND.
func (s *Store) FindTree(ctx context.Context, id string) (*branchkey.Tree, error) {
	t, err := findTree(ctx, s.rdb, id)
	return t, wrap(err, "find tree %s", id)
}

func findTree(ctx context.Context, q querier, id string) (*branchkey.Tree, error) {
	trees, err := listTrees(ctx, q, "WHERE id = ?", id)
	if err != nil {
		return nil, err
	}
	if len(trees) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "tree %q not found", id)
	}
	return trees[0], nil
}

// ListTrees returns every tree, by id.
func (s *Store) ListTrees(ctx context.Context) ([]*branchkey.Tree, error) {
	trees, err := listTrees(ctx, s.rdb, "")
	return trees, wrap(err, "list trees")
}

func listTrees(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Tree, error) {
	rows, err := q.QueryContext(ctx, "SELECT id, created_at FROM trees "+where+" ORDER BY id", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Tree
	for rows.Next() {
		var t branchkey.Tree
		var created sql.NullString
		if err := rows.Scan(&t.ID, &created); err != nil {
			return nil, err
		}
		if t.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, &t)
	}
	return out, rows.Err()
}

// DeleteTree removes a tree with its branches, leaves, tokens, updates,
// rounds, aggregations and messages, and returns its leaves' ids and the blob
// keys of its updates and aggregations. ENOTFOUND.
func (s *Store) DeleteTree(ctx context.Context, id string) (leaves []string, blobs []string, err error) {
	err = s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findTree(ctx, tx, id); err != nil {
			return err
		}
		if leaves, blobs, err = ownedBy(ctx, tx, "tree_id = ?", id); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "DELETE FROM trees WHERE id = ?", id)
		return err
	})
	if err != nil {
		return nil, nil, wrap(err, "delete tree %s", id)
	}
	return leaves, blobs, nil
}

// ownedBy returns the leaf ids and the blob keys of everything matching
// where (a condition on tree_id and branch_id), each once.
func ownedBy(ctx context.Context, tx *sql.Tx, where string, args ...any) (leaves, blobs []string, err error) {
	leaves, err = scanStrings(tx.QueryContext(ctx, "SELECT id FROM leaves WHERE "+where+" ORDER BY id", args...))
	if err != nil {
		return nil, nil, err
	}
	all := append(append(append([]any{}, args...), args...), args...)
	blobs, err = scanStrings(tx.QueryContext(ctx, `
		SELECT blob_key FROM updates WHERE `+where+`
		UNION SELECT blob_key FROM aggregations WHERE `+where+`
		UNION SELECT state_key FROM aggregations WHERE `+where+`
		ORDER BY 1`, all...))
	if err != nil {
		return nil, nil, err
	}
	keys := blobs[:0]
	for _, k := range blobs {
		if k != "" {
			keys = append(keys, k)
		}
	}
	return leaves, keys, nil
}

// branchColumns are the columns scanBranch reads, in order.
const branchColumns = `tree_id, id, min_updates, sample_size, max_wait, min_quorum, strategy,
	strategy_options, allow_non_finite, run_status, run_number, round, created_at`

// CreateBranch records a branch, setting CreatedAt if it is zero. A branch
// created started is in round 1 of run 1 (unless b names a later one), and
// that round is opened; a branch created paused or stopped has run 0 and
// round 0 until its first start. ENOTFOUND for the tree, ECONFLICT if the id
// exists, EINVALID for a run status that is not start, pause or stop.
func (s *Store) CreateBranch(ctx context.Context, b *branchkey.Branch) error {
	if b.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "branch id is empty")
	}
	if !b.RunStatus.Valid() {
		return branchkey.Errorf(branchkey.EINVALID, "branch %q has run status %q; want start, pause or stop", b.ID, b.RunStatus)
	}
	nb := *b
	if nb.CreatedAt.IsZero() {
		nb.CreatedAt = s.now()
	}
	nb.CreatedAt = nb.CreatedAt.UTC()
	if nb.RunStatus == branchkey.RunStarted {
		nb.RunNumber = max(nb.RunNumber, 1)
		nb.Round = max(nb.Round, 1)
	}
	opts, err := json.Marshal(nb.Policy.StrategyOptions)
	if err != nil {
		return fmt.Errorf("create branch %s/%s: strategy options: %w", b.TreeID, b.ID, err)
	}
	if nb.Policy.StrategyOptions == nil {
		opts = []byte("{}")
	}
	err = s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findTree(ctx, tx, nb.TreeID); err != nil {
			return err
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM branches WHERE tree_id = ? AND id = ?", nb.TreeID, nb.ID); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "branch %q already exists in tree %q", nb.ID, nb.TreeID)
		}
		p := nb.Policy
		if _, err := tx.ExecContext(ctx, `INSERT INTO branches (`+branchColumns+`)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			nb.TreeID, nb.ID, p.MinUpdates, p.SampleSize, int64(p.MaxWait), p.MinQuorum, p.Strategy,
			string(opts), p.AllowNonFinite, string(nb.RunStatus), nb.RunNumber, nb.Round, fmtTime(nb.CreatedAt)); err != nil {
			return err
		}
		if nb.RunStatus == branchkey.RunStarted {
			return openRound(ctx, tx, nb.CurrentRound())
		}
		return nil
	})
	if err != nil {
		return wrap(err, "create branch %s/%s", b.TreeID, b.ID)
	}
	*b = nb
	return nil
}

// openRound creates the open round key unless it exists.
func openRound(ctx context.Context, tx *sql.Tx, key branchkey.RoundKey) error {
	_, err := tx.ExecContext(ctx, `INSERT INTO rounds (tree_id, branch_id, run, round, status)
		VALUES (?, ?, ?, ?, 'open') ON CONFLICT DO NOTHING`, key.TreeID, key.BranchID, key.Run, key.Round)
	return err
}

// FindBranch returns a branch. ENOTFOUND.
func (s *Store) FindBranch(ctx context.Context, treeID, id string) (*branchkey.Branch, error) {
	b, err := findBranch(ctx, s.rdb, treeID, id)
	return b, wrap(err, "find branch %s/%s", treeID, id)
}

func findBranch(ctx context.Context, q querier, treeID, id string) (*branchkey.Branch, error) {
	bs, err := listBranches(ctx, q, "WHERE tree_id = ? AND id = ?", treeID, id)
	if err != nil {
		return nil, err
	}
	if len(bs) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "branch %q not found in tree %q", id, treeID)
	}
	return bs[0], nil
}

// ListBranches returns a tree's branches, by id; every branch, by tree and
// id, when treeID is "".
func (s *Store) ListBranches(ctx context.Context, treeID string) ([]*branchkey.Branch, error) {
	if treeID == "" {
		bs, err := listBranches(ctx, s.rdb, "")
		return bs, wrap(err, "list branches")
	}
	bs, err := listBranches(ctx, s.rdb, "WHERE tree_id = ?", treeID)
	return bs, wrap(err, "list branches of tree %s", treeID)
}

func listBranches(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Branch, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+branchColumns+" FROM branches "+where+" ORDER BY tree_id, id", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Branch
	for rows.Next() {
		var b branchkey.Branch
		var maxWait int64
		var opts, status string
		var created sql.NullString
		if err := rows.Scan(&b.TreeID, &b.ID, &b.Policy.MinUpdates, &b.Policy.SampleSize, &maxWait,
			&b.Policy.MinQuorum, &b.Policy.Strategy, &opts, &b.Policy.AllowNonFinite, &status,
			&b.RunNumber, &b.Round, &created); err != nil {
			return nil, err
		}
		b.Policy.MaxWait = time.Duration(maxWait)
		b.RunStatus = branchkey.RunStatus(status)
		if err := json.Unmarshal([]byte(opts), &b.Policy.StrategyOptions); err != nil {
			return nil, fmt.Errorf("branch %s/%s: strategy options %q: %w", b.TreeID, b.ID, opts, err)
		}
		if len(b.Policy.StrategyOptions) == 0 {
			b.Policy.StrategyOptions = nil
		}
		if b.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, &b)
	}
	return out, rows.Err()
}

// DeleteBranch removes a branch with its leaves, tokens, updates, rounds,
// aggregations and messages, and returns its leaves' ids and the blob keys of
// its updates and aggregations. ENOTFOUND.
func (s *Store) DeleteBranch(ctx context.Context, treeID, id string) (leaves []string, blobs []string, err error) {
	err = s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findBranch(ctx, tx, treeID, id); err != nil {
			return err
		}
		if leaves, blobs, err = ownedBy(ctx, tx, "tree_id = ? AND branch_id = ?", treeID, id); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "DELETE FROM branches WHERE tree_id = ? AND id = ?", treeID, id)
		return err
	})
	if err != nil {
		return nil, nil, wrap(err, "delete branch %s/%s", treeID, id)
	}
	return leaves, blobs, nil
}

// SetRunStatus changes a branch's run state and, in the same transaction,
// stores the message msg builds from the changed branch (none if msg is nil
// or returns nil; an empty TreeID or BranchID is the branch's). A start after
// a stop, or the first start of a branch created paused or stopped, opens the
// next run at round 1. A stop fails the run's open round, since a stopped run
// never resumes: no upload can reach it and it can never close. ENOTFOUND,
// EINVALID for an unknown status, ECONFLICT if the message id exists.
func (s *Store) SetRunStatus(ctx context.Context, treeID, id string, status branchkey.RunStatus, msg func(*branchkey.Branch) *branchkey.Message) (*branchkey.Branch, error) {
	if !status.Valid() {
		return nil, branchkey.Errorf(branchkey.EINVALID, "run status %q is not start, pause or stop", status)
	}
	var b *branchkey.Branch
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		if b, err = findBranch(ctx, tx, treeID, id); err != nil {
			return err
		}
		prev := b.RunStatus
		switch status {
		case branchkey.RunStarted:
			if prev == branchkey.RunStopped || b.RunNumber == 0 {
				b.RunNumber++
				b.Round = 1
			}
			if err := openRound(ctx, tx, b.CurrentRound()); err != nil {
				return err
			}
		case branchkey.RunStopped:
			if prev != branchkey.RunStopped {
				if _, err := tx.ExecContext(ctx, `UPDATE rounds SET status = 'failed', error = ?
					WHERE tree_id = ? AND branch_id = ? AND run = ? AND status = 'open'`,
					fmt.Sprintf("run %d was stopped before the round closed", b.RunNumber),
					b.TreeID, b.ID, b.RunNumber); err != nil {
					return err
				}
			}
		}
		b.RunStatus = status
		if _, err := tx.ExecContext(ctx, `UPDATE branches SET run_status = ?, run_number = ?, round = ?
			WHERE tree_id = ? AND id = ?`, string(b.RunStatus), b.RunNumber, b.Round, b.TreeID, b.ID); err != nil {
			return err
		}
		if msg == nil {
			return nil
		}
		m := msg(b)
		if m == nil {
			return nil
		}
		if m.TreeID == "" && m.BranchID == "" {
			m.TreeID, m.BranchID = b.TreeID, b.ID
		}
		return s.insertMessage(ctx, tx, m)
	})
	if err != nil {
		return nil, wrap(err, "set run status of branch %s/%s to %s", treeID, id, status)
	}
	return b, nil
}
