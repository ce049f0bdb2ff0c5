package sqlite

import (
	"context"
	"database/sql"
	"time"

	"github.com/branchkey/branchkey"
)

// roundSelect reads a round with its Count: the distinct leaves with a
// current (not superseded) update in it.
const roundSelect = `SELECT r.tree_id, r.branch_id, r.run, r.round, r.status, r.signature,
	r.first_update_at, r.closed_at, r.trigger, r.inputs, r.claim_owner, r.claim_until,
	r.aggregation_id, r.error,
	(SELECT COUNT(DISTINCT u.leaf_id) FROM updates u
		WHERE u.tree_id = r.tree_id AND u.branch_id = r.branch_id AND u.run = r.run
		AND u.round = r.round AND u.superseded = 0)
	FROM rounds r `

// roundKeyWhere selects one round by key.
const roundKeyWhere = "WHERE r.tree_id = ? AND r.branch_id = ? AND r.run = ? AND r.round = ?"

// FindRound returns a round. ENOTFOUND.
func (s *Store) FindRound(ctx context.Context, key branchkey.RoundKey) (*branchkey.Round, error) {
	r, err := findRound(ctx, s.rdb, key)
	return r, wrap(err, "find %s", key.String())
}

func findRound(ctx context.Context, q querier, key branchkey.RoundKey) (*branchkey.Round, error) {
	rs, err := listRounds(ctx, q, roundKeyWhere, key.TreeID, key.BranchID, key.Run, key.Round)
	if err != nil {
		return nil, err
	}
	if len(rs) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "%s not found", key.String())
	}
	return rs[0], nil
}

func listRounds(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Round, error) {
	rows, err := q.QueryContext(ctx, roundSelect+where+" ORDER BY r.tree_id, r.branch_id, r.run, r.round", args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Round
	for rows.Next() {
		var r branchkey.Round
		var status, inputs string
		var first, closed, until sql.NullString
		if err := rows.Scan(&r.TreeID, &r.BranchID, &r.Run, &r.Round, &status, &r.Signature,
			&first, &closed, &r.Trigger, &inputs, &r.ClaimOwner, &until, &r.AggregationID, &r.Error,
			&r.Count); err != nil {
			return nil, err
		}
		r.Status = branchkey.RoundStatus(status)
		if r.FirstUpdateAt, err = parseTime(first); err != nil {
			return nil, err
		}
		if r.ClosedAt, err = parseTime(closed); err != nil {
			return nil, err
		}
		if r.ClaimUntil, err = parseTime(until); err != nil {
			return nil, err
		}
		if r.Inputs, err = parseList(inputs); err != nil {
			return nil, err
		}
		out = append(out, &r)
	}
	return out, rows.Err()
}

// OpenRounds returns every open round that has at least one current update,
// by key.
func (s *Store) OpenRounds(ctx context.Context) ([]*branchkey.Round, error) {
	rs, err := listRounds(ctx, s.rdb, `WHERE r.status = 'open' AND EXISTS (SELECT 1 FROM updates u
		WHERE u.tree_id = r.tree_id AND u.branch_id = r.branch_id AND u.run = r.run
		AND u.round = r.round AND u.superseded = 0)`)
	return rs, wrap(err, "list open rounds")
}

// CloseRound closes the open round key, if it is still the branch's current
// round, records the inputs pick chooses from its current updates (all of
// them if pick is nil) and opens the next round, all in one transaction.
// Exactly one of concurrent callers succeeds; the others get ECONFLICT. An
// error from pick aborts and is returned unchanged. ENOTFOUND for the branch
// or round, EINVALID if pick names an update that is not in the round.
func (s *Store) CloseRound(ctx context.Context, key branchkey.RoundKey, trigger string, pick func([]*branchkey.Update) ([]string, error)) (*branchkey.Round, error) {
	var r *branchkey.Round
	err := s.write(ctx, func(tx *sql.Tx) error {
		b, err := findBranch(ctx, tx, key.TreeID, key.BranchID)
		if err != nil {
			return err
		}
		if b.RunNumber != key.Run || b.Round != key.Round {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is not the branch's current round (run %d, round %d)", key.String(), b.RunNumber, b.Round)
		}
		if r, err = findRound(ctx, tx, key); err != nil {
			return err
		}
		if r.Status != branchkey.RoundOpen {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is %s, not open", key.String(), r.Status)
		}
		ups, err := roundUpdates(ctx, tx, key)
		if err != nil {
			return err
		}
		var inputs []string
		if pick == nil {
			for _, u := range ups {
				inputs = append(inputs, u.ID)
			}
		} else {
			if inputs, err = pick(ups); err != nil {
				return &callbackError{err}
			}
			if err := branchkey.CheckInputs(key, ups, inputs); err != nil {
				return err
			}
		}
		list, err := jsonList(inputs)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE rounds SET status = 'closed', closed_at = ?, trigger = ?, inputs = ?
			WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ? AND status = 'open'`,
			fmtTime(s.now()), trigger, list, key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, "UPDATE branches SET round = round + 1 WHERE tree_id = ? AND id = ?",
			key.TreeID, key.BranchID); err != nil {
			return err
		}
		next := key
		next.Round++
		if err := openRound(ctx, tx, next); err != nil {
			return err
		}
		r, err = findRound(ctx, tx, key)
		return err
	})
	if err != nil {
		return nil, wrap(err, "close %s", key.String())
	}
	return r, nil
}

// ClaimRound gives owner the right to aggregate a closed round until until,
// if nobody else holds a claim that is unexpired at now; owner may renew its
// own claim. ENOTFOUND, ECONFLICT if the round is not closed or someone else
// holds it, EINVALID for an empty owner.
func (s *Store) ClaimRound(ctx context.Context, key branchkey.RoundKey, owner string, now, until time.Time) (*branchkey.Round, error) {
	if owner == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "claim owner is empty")
	}
	var r *branchkey.Round
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		if r, err = findRound(ctx, tx, key); err != nil {
			return err
		}
		if r.Status != branchkey.RoundClosed {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is %s, not closed", key.String(), r.Status)
		}
		if r.ClaimOwner != "" && r.ClaimOwner != owner && r.ClaimUntil.After(now) {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is claimed by %q until %s", key.String(), r.ClaimOwner, r.ClaimUntil.Format(time.RFC3339Nano))
		}
		if _, err := tx.ExecContext(ctx, `UPDATE rounds SET claim_owner = ?, claim_until = ?
			WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ?`,
			owner, fmtTime(until), key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
			return err
		}
		r, err = findRound(ctx, tx, key)
		return err
	})
	if err != nil {
		return nil, wrap(err, "claim %s for %s", key.String(), owner)
	}
	return r, nil
}

// PendingRounds returns closed rounds that nobody holds a claim on at now,
// unclaimed or with a claim that expired, by key.
func (s *Store) PendingRounds(ctx context.Context, now time.Time) ([]*branchkey.Round, error) {
	rs, err := listRounds(ctx, s.rdb, `WHERE r.status = 'closed'
		AND (r.claim_owner = '' OR r.claim_until IS NULL OR r.claim_until <= ?)`, fmtTime(now))
	return rs, wrap(err, "list pending rounds")
}

// claimed loads a round and checks that owner holds its claim. The claim's
// expiry is not checked: with no later claimant the round is still the
// owner's to finish, and a later claimant replaces the owner.
func claimed(ctx context.Context, tx *sql.Tx, key branchkey.RoundKey, owner string) error {
	r, err := findRound(ctx, tx, key)
	if err != nil {
		return err
	}
	if r.Status != branchkey.RoundClosed {
		return branchkey.Errorf(branchkey.ECONFLICT, "%s is %s, not closed", key.String(), r.Status)
	}
	if owner == "" || r.ClaimOwner != owner {
		return branchkey.Errorf(branchkey.ECONFLICT, "%s is not claimed by %q (claim owner %q)", key.String(), owner, r.ClaimOwner)
	}
	return nil
}

// FinishRound records the aggregation of a round claimed by owner and, in the
// same transaction, marks the round done with a.ID as its aggregation and
// stores msgs (an empty TreeID and BranchID are the round's). It fills
// a.FinishedAt if it is zero and each message's Seq and CreatedAt.
// ENOTFOUND for the round, ECONFLICT if owner does not hold the claim or an
// aggregation or message id exists.
func (s *Store) FinishRound(ctx context.Context, a *branchkey.Aggregation, owner string, msgs []*branchkey.Message) error {
	if a.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "aggregation id is empty")
	}
	key := branchkey.RoundKey{TreeID: a.TreeID, BranchID: a.BranchID, Run: a.Run, Round: a.Round}
	na := *a
	if na.FinishedAt.IsZero() {
		na.FinishedAt = s.now()
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		if err := claimed(ctx, tx, key, owner); err != nil {
			return err
		}
		if err := insertAggregation(ctx, tx, &na); err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE rounds SET status = 'done', aggregation_id = ?
			WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ?`,
			na.ID, key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
			return err
		}
		for _, m := range msgs {
			if m.TreeID == "" && m.BranchID == "" {
				m.TreeID, m.BranchID = key.TreeID, key.BranchID
			}
			if err := s.insertMessage(ctx, tx, m); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return wrap(err, "finish %s", key.String())
	}
	*a = na
	return nil
}

// FailRound marks a round claimed by owner failed with the reason.
// ENOTFOUND, ECONFLICT if owner does not hold the claim.
func (s *Store) FailRound(ctx context.Context, key branchkey.RoundKey, owner, reason string) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		if err := claimed(ctx, tx, key, owner); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `UPDATE rounds SET status = 'failed', error = ?
			WHERE tree_id = ? AND branch_id = ? AND run = ? AND round = ?`,
			reason, key.TreeID, key.BranchID, key.Run, key.Round)
		return err
	})
	return wrap(err, "fail %s", key.String())
}
