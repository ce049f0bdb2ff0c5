package postgres

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/branchkey/branchkey"
)

// CreateTree records a tree, setting CreatedAt if it is zero. ECONFLICT if
// the id exists, EINVALID for an empty id or one PostgreSQL cannot store.
func (s *Store) CreateTree(ctx context.Context, t *branchkey.Tree) error {
	if t.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "tree id is empty")
	}
	if err := checkText("tree id", t.ID); err != nil {
		return err
	}
	created := t.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "INSERT INTO trees (id, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING", t.ID, created)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return branchkey.Errorf(branchkey.ECONFLICT, "tree %q already exists", t.ID)
		}
		return nil
	})
	if err != nil {
		return wrap(err, "create tree %s", t.ID)
	}
	t.CreatedAt = stored(created)
	return nil
}

// FindTree returns a tree. ENOTFOUND.
func (s *Store) FindTree(ctx context.Context, id string) (*branchkey.Tree, error) {
	var t *branchkey.Tree
	err := s.read(ctx, func(q querier) (err error) {
		t, err = findTree(ctx, q, id, "")
		return err
	})
	return t, wrap(err, "find tree %s", id)
}

// findTree reads a tree, with lock ("" or "FOR UPDATE", ...) appended.
func findTree(ctx context.Context, q querier, id, lock string) (*branchkey.Tree, error) {
	if !storable(id) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "tree %q not found", id)
	}
	trees, err := listTrees(ctx, q, "WHERE id = $1 "+lock, id)
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
	var trees []*branchkey.Tree
	err := s.read(ctx, func(q querier) (err error) {
		trees, err = listTrees(ctx, q, "ORDER BY id")
		return err
	})
	return trees, wrap(err, "list trees")
}

func listTrees(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Tree, error) {
	rows, err := q.Query(ctx, "SELECT id, created_at FROM trees "+where, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*branchkey.Tree, error) {
		var t branchkey.Tree
		if err := row.Scan(&t.ID, &t.CreatedAt); err != nil {
			return nil, err
		}
		t.CreatedAt = t.CreatedAt.UTC()
		return &t, nil
	})
}

// DeleteTree removes a tree with its branches, leaves, tokens, updates,
// rounds, aggregations and messages, and returns its leaves' ids and the blob
// keys of its updates and aggregations. ENOTFOUND.
func (s *Store) DeleteTree(ctx context.Context, id string) (leaves []string, blobs []string, err error) {
	err = s.write(ctx, func(tx pgx.Tx) error {
		// The tree's row first, then its branches' in id order, as every
		// transaction takes them: once they are locked no upload, close
		// or finish is in flight in the tree, and none can start.
		if _, err := findTree(ctx, tx, id, "FOR UPDATE"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT 1 FROM branches WHERE tree_id = $1 ORDER BY id FOR UPDATE", id); err != nil {
			return err
		}
		if leaves, blobs, err = ownedBy(ctx, tx, "tree_id = $1", id); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "DELETE FROM trees WHERE id = $1", id)
		return err
	})
	if err != nil {
		return nil, nil, wrap(err, "delete tree %s", id)
	}
	return leaves, blobs, nil
}

// ownedBy returns the leaf ids and the blob keys of everything matching
// where (a condition on tree_id and branch_id), each once.
func ownedBy(ctx context.Context, tx pgx.Tx, where string, args ...any) (leaves, blobs []string, err error) {
	leaves, err = scanStrings(tx.Query(ctx, "SELECT id FROM leaves WHERE "+where+" ORDER BY id", args...))
	if err != nil {
		return nil, nil, err
	}
	blobs, err = scanStrings(tx.Query(ctx, `
		SELECT blob_key FROM updates WHERE `+where+` AND blob_key <> ''
		UNION SELECT blob_key FROM aggregations WHERE `+where+` AND blob_key <> ''
		UNION SELECT state_key FROM aggregations WHERE `+where+` AND state_key <> ''
		ORDER BY 1`, args...))
	if err != nil {
		return nil, nil, err
	}
	return leaves, blobs, nil
}

// branchColumns are the columns listBranches reads, in order.
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
	if err := checkText("tree id", b.TreeID, "branch id", b.ID, "strategy", b.Policy.Strategy); err != nil {
		return err
	}
	for k, v := range b.Policy.StrategyOptions {
		if err := checkText("strategy option", k, "strategy option value", v); err != nil {
			return err
		}
	}
	nb := *b
	if nb.CreatedAt.IsZero() {
		nb.CreatedAt = s.now()
	}
	nb.CreatedAt = stored(nb.CreatedAt)
	if nb.RunStatus == branchkey.RunStarted {
		nb.RunNumber = max(nb.RunNumber, 1)
		nb.Round = max(nb.Round, 1)
	}
	opts := "{}"
	if nb.Policy.StrategyOptions != nil {
		var err error
		if opts, err = jsonText(nb.Policy.StrategyOptions); err != nil {
			return fmt.Errorf("create branch %s/%s: strategy options: %w", b.TreeID, b.ID, err)
		}
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		// KEY SHARE keeps the tree from being deleted until this commits.
		if _, err := findTree(ctx, tx, nb.TreeID, "FOR KEY SHARE"); err != nil {
			return err
		}
		p := nb.Policy
		tag, err := tx.Exec(ctx, `INSERT INTO branches (`+branchColumns+`)
			VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING`,
			nb.TreeID, nb.ID, p.MinUpdates, p.SampleSize, int64(p.MaxWait), p.MinQuorum, p.Strategy,
			opts, p.AllowNonFinite, string(nb.RunStatus), nb.RunNumber, nb.Round, nb.CreatedAt)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return branchkey.Errorf(branchkey.ECONFLICT, "branch %q already exists in tree %q", nb.ID, nb.TreeID)
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
func openRound(ctx context.Context, tx pgx.Tx, key branchkey.RoundKey) error {
	_, err := tx.Exec(ctx, `INSERT INTO rounds (tree_id, branch_id, run, round, status)
		VALUES ($1, $2, $3, $4, 'open') ON CONFLICT DO NOTHING`, key.TreeID, key.BranchID, key.Run, key.Round)
	return err
}

// FindBranch returns a branch. ENOTFOUND.
func (s *Store) FindBranch(ctx context.Context, treeID, id string) (*branchkey.Branch, error) {
	var b *branchkey.Branch
	err := s.read(ctx, func(q querier) (err error) {
		b, err = findBranch(ctx, q, treeID, id, "")
		return err
	})
	return b, wrap(err, "find branch %s/%s", treeID, id)
}

// findBranch reads a branch, with lock ("" or "FOR NO KEY UPDATE", ...)
// appended.
func findBranch(ctx context.Context, q querier, treeID, id, lock string) (*branchkey.Branch, error) {
	if !storable(treeID, id) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "branch %q not found in tree %q", id, treeID)
	}
	bs, err := listBranches(ctx, q, "WHERE tree_id = $1 AND id = $2 "+lock, treeID, id)
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
	var bs []*branchkey.Branch
	err := s.read(ctx, func(q querier) (err error) {
		if treeID == "" {
			bs, err = listBranches(ctx, q, "ORDER BY tree_id, id")
		} else if storable(treeID) {
			bs, err = listBranches(ctx, q, "WHERE tree_id = $1 ORDER BY id", treeID)
		}
		return err
	})
	if treeID == "" {
		return bs, wrap(err, "list branches")
	}
	return bs, wrap(err, "list branches of tree %s", treeID)
}

func listBranches(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Branch, error) {
	rows, err := q.Query(ctx, "SELECT "+branchColumns+" FROM branches "+where, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*branchkey.Branch, error) {
		var b branchkey.Branch
		var maxWait int64
		var opts, status string
		if err := row.Scan(&b.TreeID, &b.ID, &b.Policy.MinUpdates, &b.Policy.SampleSize, &maxWait,
			&b.Policy.MinQuorum, &b.Policy.Strategy, &opts, &b.Policy.AllowNonFinite, &status,
			&b.RunNumber, &b.Round, &b.CreatedAt); err != nil {
			return nil, err
		}
		b.Policy.MaxWait = time.Duration(maxWait)
		b.RunStatus = branchkey.RunStatus(status)
		b.CreatedAt = b.CreatedAt.UTC()
		if err := json.Unmarshal([]byte(opts), &b.Policy.StrategyOptions); err != nil {
			return nil, fmt.Errorf("branch %s/%s: strategy options %q: %w", b.TreeID, b.ID, opts, err)
		}
		if len(b.Policy.StrategyOptions) == 0 {
			b.Policy.StrategyOptions = nil
		}
		return &b, nil
	})
}

// DeleteBranch removes a branch with its leaves, tokens, updates, rounds,
// aggregations and messages, and returns its leaves' ids and the blob keys of
// its updates and aggregations. ENOTFOUND.
func (s *Store) DeleteBranch(ctx context.Context, treeID, id string) (leaves []string, blobs []string, err error) {
	err = s.write(ctx, func(tx pgx.Tx) error {
		if _, err := findBranch(ctx, tx, treeID, id, "FOR UPDATE"); err != nil {
			return err
		}
		if leaves, blobs, err = ownedBy(ctx, tx, "tree_id = $1 AND branch_id = $2", treeID, id); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "DELETE FROM branches WHERE tree_id = $1 AND id = $2", treeID, id)
		return err
	})
	if err != nil {
		return nil, nil, wrap(err, "delete branch %s/%s", treeID, id)
	}
	return leaves, blobs, nil
}

// SetRunStatus changes a branch's run state and, in the same transaction,
// stores the message msg builds from the changed branch (none if msg is nil
// or returns nil; an empty TreeID and BranchID are the branch's). A start
// after a stop, or the first start of a branch created paused or stopped,
// opens the next run at round 1. A stop fails the run's open round, since a
// stopped run never resumes: no upload can reach it and it can never close.
// ENOTFOUND, EINVALID for an unknown status, ECONFLICT if the message id
// exists. msg may run more than once (see Store).
func (s *Store) SetRunStatus(ctx context.Context, treeID, id string, status branchkey.RunStatus, msg func(*branchkey.Branch) *branchkey.Message) (*branchkey.Branch, error) {
	if !status.Valid() {
		return nil, branchkey.Errorf(branchkey.EINVALID, "run status %q is not start, pause or stop", status)
	}
	var b *branchkey.Branch
	err := s.write(ctx, func(tx pgx.Tx) error {
		var err error
		if b, err = findBranch(ctx, tx, treeID, id, "FOR NO KEY UPDATE"); err != nil {
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
				if _, err := tx.Exec(ctx, `UPDATE rounds SET status = 'failed', error = $1
					WHERE tree_id = $2 AND branch_id = $3 AND run = $4 AND status = 'open'`,
					fmt.Sprintf("run %d was stopped before the round closed", b.RunNumber),
					b.TreeID, b.ID, b.RunNumber); err != nil {
					return err
				}
			}
		}
		b.RunStatus = status
		if _, err := tx.Exec(ctx, `UPDATE branches SET run_status = $1, run_number = $2, round = $3
			WHERE tree_id = $4 AND id = $5`, string(b.RunStatus), b.RunNumber, b.Round, b.TreeID, b.ID); err != nil {
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
		return s.insertMessages(ctx, tx, []*branchkey.Message{m})
	})
	if err != nil {
		return nil, wrap(err, "set run status of branch %s/%s to %s", treeID, id, status)
	}
	return b, nil
}
