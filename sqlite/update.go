package sqlite

import (
	"context"
	"database/sql"

	"github.com/branchkey/branchkey"
)

// updateColumns are the columns listUpdates reads, in order.
const updateColumns = `id, tree_id, branch_id, leaf_id, run, round, num_samples, size, blob_key,
	signature, filename, metadata, idempotency_key, superseded, created_at`

// PutUpdate records u in its branch's open round, replacing the leaf's
// earlier update of that round, and fills u.Run, u.Round and, if it is zero,
// u.CreatedAt. It creates the round's row if the round has none yet; the
// round's Signature and FirstUpdateAt are set by its first update.
//
// A retry (same leaf and non-empty idempotency key as a recorded update)
// writes nothing and returns the recorded update as Existing, whatever the
// run's state, so that a client retrying a successful upload gets its answer.
// check runs inside the transaction with the round as it is before u; an
// error from it aborts and is returned unchanged.
//
// ENOTFOUND for the branch or the leaf (or a leaf of another branch),
// ECONFLICT when the run is not started or the update id exists.
func (s *Store) PutUpdate(ctx context.Context, u *branchkey.Update, check func(*branchkey.Round) error) (*branchkey.PutResult, error) {
	if u.ID == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "update id is empty")
	}
	nu := *u
	if nu.CreatedAt.IsZero() {
		nu.CreatedAt = s.now()
	}
	nu.CreatedAt = nu.CreatedAt.UTC()
	nu.Superseded = false
	var res *branchkey.PutResult
	err := s.write(ctx, func(tx *sql.Tx) error {
		if nu.IdempotencyKey != "" {
			prev, err := findUpdateByKey(ctx, tx, nu.LeafID, nu.IdempotencyKey)
			if err == nil {
				r, err := findRound(ctx, tx, prev.RoundKey())
				if err != nil {
					return err
				}
				res = &branchkey.PutResult{Round: r, Existing: prev}
				return nil
			} else if branchkey.ErrorCode(err) != branchkey.ENOTFOUND {
				return err
			}
		}

		b, err := findBranch(ctx, tx, nu.TreeID, nu.BranchID)
		if err != nil {
			return err
		}
		if b.RunStatus != branchkey.RunStarted {
			return branchkey.Errorf(branchkey.ECONFLICT, "branch %q of tree %q is not running (run %d: %s)", b.ID, b.TreeID, b.RunNumber, b.RunStatus)
		}
		l, err := findLeaf(ctx, tx, nu.LeafID)
		if err != nil {
			return err
		}
		if l.TreeID != nu.TreeID || l.BranchID != nu.BranchID {
			return branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q not found in branch %q of tree %q", nu.LeafID, nu.BranchID, nu.TreeID)
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM updates WHERE id = ?", nu.ID); err != nil {
			return err
		} else if ok {
			return branchkey.Errorf(branchkey.ECONFLICT, "update %q already exists", nu.ID)
		}

		key := b.CurrentRound()
		if err := openRound(ctx, tx, key); err != nil {
			return err
		}
		r, err := findRound(ctx, tx, key)
		if err != nil {
			return err
		}
		if r.Status != branchkey.RoundOpen {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is %s, not open", key.String(), r.Status)
		}
		if check != nil {
			if err := check(r); err != nil {
				return &callbackError{err}
			}
		}

		prevs, err := listUpdates(ctx, tx, `WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ?
			AND leaf_id = ? AND superseded = 0`, key.TreeID, key.BranchID, key.Run, key.Round, nu.LeafID)
		if err != nil {
			return err
		}
		res = &branchkey.PutResult{}
		if len(prevs) > 0 {
			if _, err := tx.ExecContext(ctx, `UPDATE updates SET superseded = 1 WHERE tree_id = ? AND branch_id = ?
				AND run = ? AND round = ? AND leaf_id = ? AND superseded = 0`,
				key.TreeID, key.BranchID, key.Run, key.Round, nu.LeafID); err != nil {
				return err
			}
			res.Replaced = prevs[len(prevs)-1]
			res.Replaced.Superseded = true
		}

		nu.Run, nu.Round = key.Run, key.Round
		if _, err := tx.ExecContext(ctx, "INSERT INTO updates ("+updateColumns+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
			nu.ID, nu.TreeID, nu.BranchID, nu.LeafID, nu.Run, nu.Round, nu.NumSamples, nu.Size, nu.BlobKey,
			nu.Signature, nu.Filename, nu.Metadata, nu.IdempotencyKey, false, fmtTime(nu.CreatedAt)); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE rounds
			SET signature = CASE WHEN signature = '' THEN ? ELSE signature END,
			    first_update_at = COALESCE(first_update_at, ?)
			WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ?`,
			nu.Signature, fmtTime(nu.CreatedAt), key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
			return err
		}
		res.Round, err = findRound(ctx, tx, key)
		return err
	})
	if err != nil {
		return nil, wrap(err, "put update %s", u.ID)
	}
	if res.Existing == nil {
		*u = nu
	}
	return res, nil
}

// FindUpdate returns an update. ENOTFOUND.
func (s *Store) FindUpdate(ctx context.Context, id string) (*branchkey.Update, error) {
	us, err := listUpdates(ctx, s.rdb, "WHERE id = ?", id)
	if err != nil {
		return nil, wrap(err, "find update %s", id)
	}
	if len(us) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "update %q not found", id)
	}
	return us[0], nil
}

// FindUpdateByKey returns the leaf's update with that idempotency key.
// ENOTFOUND, also for an empty key.
func (s *Store) FindUpdateByKey(ctx context.Context, leafID, key string) (*branchkey.Update, error) {
	u, err := findUpdateByKey(ctx, s.rdb, leafID, key)
	return u, wrap(err, "find update of leaf %s by idempotency key", leafID)
}

func findUpdateByKey(ctx context.Context, q querier, leafID, key string) (*branchkey.Update, error) {
	if key != "" {
		us, err := listUpdates(ctx, q, "WHERE leaf_id = ? AND idempotency_key = ?", leafID, key)
		if err != nil {
			return nil, err
		}
		if len(us) > 0 {
			return us[0], nil
		}
	}
	return nil, branchkey.Errorf(branchkey.ENOTFOUND, "no update of leaf %q has idempotency key %q", leafID, key)
}

// RoundUpdates returns the round's current (not superseded) updates, by id.
func (s *Store) RoundUpdates(ctx context.Context, key branchkey.RoundKey) ([]*branchkey.Update, error) {
	us, err := roundUpdates(ctx, s.rdb, key)
	return us, wrap(err, "list updates of %s", key.String())
}

func roundUpdates(ctx context.Context, q querier, key branchkey.RoundKey) ([]*branchkey.Update, error) {
	return listUpdates(ctx, q, "WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ? AND superseded = 0",
		key.TreeID, key.BranchID, key.Run, key.Round)
}

func listUpdates(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Update, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+updateColumns+" FROM updates "+where+" ORDER BY id", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Update
	for rows.Next() {
		var u branchkey.Update
		var created sql.NullString
		if err := rows.Scan(&u.ID, &u.TreeID, &u.BranchID, &u.LeafID, &u.Run, &u.Round, &u.NumSamples,
			&u.Size, &u.BlobKey, &u.Signature, &u.Filename, &u.Metadata, &u.IdempotencyKey,
			&u.Superseded, &created); err != nil {
			return nil, err
		}
		if u.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, &u)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return out, nil
}
