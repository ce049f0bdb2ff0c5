package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/branchkey/branchkey"
)

// roundSelect reads a round with its Count: the distinct leaves with a
// current (not superseded) update in it.
const roundSelect = `SELECT r.tree_id, r.branch_id, r.run, r.round, r.status, r.signature,
	r.first_update_at, r.closed_at, r.trigger, r.inputs, r.claim_owner, r.claim_until,
	r.aggregation_id, r.error,
	(SELECT COUNT(DISTINCT u.leaf_id) FROM updates u
		WHERE u.tree_id = r.tree_id AND u.branch_id = r.branch_id AND u.run = r.run
		AND u.round = r.round AND NOT u.superseded)
	FROM rounds r `

// roundKeyWhere selects one round by key.
const roundKeyWhere = "WHERE r.tree_id = $1 AND r.branch_id = $2 AND r.run = $3 AND r.round = $4 "

// roundOrder lists rounds by key.
const roundOrder = " ORDER BY r.tree_id, r.branch_id, r.run, r.round"

// FindRound returns a round. ENOTFOUND.
func (s *Store) FindRound(ctx context.Context, key branchkey.RoundKey) (*branchkey.Round, error) {
	var r *branchkey.Round
	err := s.read(ctx, func(q querier) (err error) {
		r, err = findRound(ctx, q, key)
		return err
	})
	return r, wrap(err, "find %s", key.String())
}

func findRound(ctx context.Context, q querier, key branchkey.RoundKey) (*branchkey.Round, error) {
	if !storable(key.TreeID, key.BranchID) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "%s not found", key.String())
	}
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
	rows, err := q.Query(ctx, roundSelect+where+roundOrder, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*branchkey.Round, error) {
		var r branchkey.Round
		var status string
		var first, closed, until pgtype.Timestamptz
		var inputs []string
		if err := row.Scan(&r.TreeID, &r.BranchID, &r.Run, &r.Round, &status, &r.Signature,
			&first, &closed, &r.Trigger, &inputs, &r.ClaimOwner, &until, &r.AggregationID, &r.Error,
			&r.Count); err != nil {
			return nil, err
		}
		r.Status = branchkey.RoundStatus(status)
		r.FirstUpdateAt, r.ClosedAt, r.ClaimUntil = timeOf(first), timeOf(closed), timeOf(until)
		r.Inputs = listOf(inputs)
		return &r, nil
	})
}

// OpenRounds returns every open round that has at least one current update,
// by key.
func (s *Store) OpenRounds(ctx context.Context) ([]*branchkey.Round, error) {
	var rs []*branchkey.Round
	err := s.read(ctx, func(q querier) (err error) {
		rs, err = listRounds(ctx, q, `WHERE r.status = 'open' AND EXISTS (SELECT 1 FROM updates u
			WHERE u.tree_id = r.tree_id AND u.branch_id = r.branch_id AND u.run = r.run
			AND u.round = r.round AND NOT u.superseded)`)
		return err
	})
	return rs, wrap(err, "list open rounds")
}

// CloseRound closes the open round key, if it is still the branch's current
// round, records the inputs pick chooses from its current updates (all of
// them if pick is nil) and opens the next round, all in one transaction.
//
// Exactly one of concurrent callers, in any process, succeeds; the others
// get ECONFLICT. The transaction starts by locking the branch's row, so
// closers of one branch take turns: the first closes the round and moves the
// branch to the next one; each later one then finds the branch's current
// round is not key any more. The round's own UPDATE is conditional on it
// still being open as well.
//
// An error from pick aborts and is returned unchanged; pick may run more
// than once (see Store). ENOTFOUND for the branch or round, EINVALID if pick
// names an update that is not in the round.
func (s *Store) CloseRound(ctx context.Context, key branchkey.RoundKey, trigger string, pick func([]*branchkey.Update) ([]string, error)) (*branchkey.Round, error) {
	if err := checkText("trigger", trigger); err != nil {
		return nil, err
	}
	var r *branchkey.Round
	err := s.write(ctx, func(tx pgx.Tx) error {
		b, err := findBranch(ctx, tx, key.TreeID, key.BranchID, "FOR NO KEY UPDATE")
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
		tag, err := tx.Exec(ctx, `UPDATE rounds SET status = 'closed', closed_at = $1, trigger = $2, inputs = $3
			WHERE tree_id = $4 AND branch_id = $5 AND run = $6 AND round = $7 AND status = 'open'`,
			s.now(), trigger, list(inputs), key.TreeID, key.BranchID, key.Run, key.Round)
		if err != nil {
			return err
		}
		if tag.RowsAffected() != 1 {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is no longer open", key.String())
		}
		if _, err := tx.Exec(ctx, "UPDATE branches SET round = round + 1 WHERE tree_id = $1 AND id = $2",
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
// own claim.
//
// The claim is one conditional UPDATE: it changes the row only if the round
// is closed and unclaimed, claimed by owner or claimed until now or earlier.
// Concurrent claimers, in any process, queue on the row's lock, and each
// re-evaluates the condition on the row the one before it left, so only the
// first of them gets it; a replica that finds a claim expired takes it over
// the same way. ENOTFOUND, ECONFLICT if the round is not closed or someone
// else holds it, EINVALID for an empty owner.
func (s *Store) ClaimRound(ctx context.Context, key branchkey.RoundKey, owner string, now, until time.Time) (*branchkey.Round, error) {
	if owner == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "claim owner is empty")
	}
	if err := checkText("claim owner", owner); err != nil {
		return nil, err
	}
	var r *branchkey.Round
	err := s.write(ctx, func(tx pgx.Tx) error {
		if _, err := findBranch(ctx, tx, key.TreeID, key.BranchID, "FOR KEY SHARE"); err != nil {
			if branchkey.ErrorCode(err) == branchkey.ENOTFOUND {
				return branchkey.Errorf(branchkey.ENOTFOUND, "%s not found", key.String())
			}
			return err
		}
		tag, err := tx.Exec(ctx, `UPDATE rounds SET claim_owner = $1, claim_until = $2
			WHERE tree_id = $3 AND branch_id = $4 AND run = $5 AND round = $6 AND status = 'closed'
			AND (claim_owner = '' OR claim_owner = $1 OR claim_until IS NULL OR claim_until <= $7)`,
			owner, until, key.TreeID, key.BranchID, key.Run, key.Round, now)
		if err != nil {
			return err
		}
		if r, err = findRound(ctx, tx, key); err != nil {
			return err
		}
		if tag.RowsAffected() == 1 {
			return nil
		}
		if r.Status != branchkey.RoundClosed {
			return branchkey.Errorf(branchkey.ECONFLICT, "%s is %s, not closed", key.String(), r.Status)
		}
		return branchkey.Errorf(branchkey.ECONFLICT, "%s is claimed by %q until %s", key.String(), r.ClaimOwner, r.ClaimUntil.Format(time.RFC3339Nano))
	})
	if err != nil {
		return nil, wrap(err, "claim %s for %s", key.String(), owner)
	}
	return r, nil
}

// PendingRounds returns closed rounds that nobody holds a claim on at now,
// unclaimed or with a claim that expired, by key.
func (s *Store) PendingRounds(ctx context.Context, now time.Time) ([]*branchkey.Round, error) {
	var rs []*branchkey.Round
	err := s.read(ctx, func(q querier) (err error) {
		rs, err = listRounds(ctx, q, `WHERE r.status = 'closed'
			AND (r.claim_owner = '' OR r.claim_until IS NULL OR r.claim_until <= $1)`, now)
		return err
	})
	return rs, wrap(err, "list pending rounds")
}

// claimed locks the round's branch and the round, and checks that owner holds
// the round's claim. The claim's expiry is not checked: with no later
// claimant the round is still the owner's to finish, and a later claimant
// replaces the owner.
func claimed(ctx context.Context, tx pgx.Tx, key branchkey.RoundKey, owner string) error {
	if _, err := findBranch(ctx, tx, key.TreeID, key.BranchID, "FOR KEY SHARE"); err != nil {
		if branchkey.ErrorCode(err) == branchkey.ENOTFOUND {
			return branchkey.Errorf(branchkey.ENOTFOUND, "%s not found", key.String())
		}
		return err
	}
	if _, err := tx.Exec(ctx, "SELECT 1 FROM rounds WHERE tree_id = $1 AND branch_id = $2 AND run = $3 AND round = $4 FOR NO KEY UPDATE",
		key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
		return err
	}
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
	if err := checkText("aggregation id", a.ID, "strategy", a.Strategy, "mode", a.Mode, "blob key", a.BlobKey, "state key", a.StateKey); err != nil {
		return err
	}
	for _, id := range a.Inputs {
		if err := checkText("input", id); err != nil {
			return err
		}
	}
	key := branchkey.RoundKey{TreeID: a.TreeID, BranchID: a.BranchID, Run: a.Run, Round: a.Round}
	na := *a
	if na.FinishedAt.IsZero() {
		na.FinishedAt = s.now()
	}
	na.StartedAt, na.FinishedAt = storedOrZero(na.StartedAt), storedOrZero(na.FinishedAt)
	err := s.write(ctx, func(tx pgx.Tx) error {
		if err := claimed(ctx, tx, key, owner); err != nil {
			return err
		}
		if err := insertAggregation(ctx, tx, &na); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE rounds SET status = 'done', aggregation_id = $1
			WHERE tree_id = $2 AND branch_id = $3 AND run = $4 AND round = $5`,
			na.ID, key.TreeID, key.BranchID, key.Run, key.Round); err != nil {
			return err
		}
		for _, m := range msgs {
			if m.TreeID == "" && m.BranchID == "" {
				m.TreeID, m.BranchID = key.TreeID, key.BranchID
			}
		}
		return s.insertMessages(ctx, tx, msgs)
	})
	if err != nil {
		return wrap(err, "finish %s", key.String())
	}
	*a = na
	return nil
}

// storedOrZero is stored(t), keeping the zero time zero.
func storedOrZero(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return stored(t)
}

// FailRound marks a round claimed by owner failed with the reason.
// ENOTFOUND, ECONFLICT if owner does not hold the claim.
func (s *Store) FailRound(ctx context.Context, key branchkey.RoundKey, owner, reason string) error {
	if err := checkText("reason", reason); err != nil {
		return err
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		if err := claimed(ctx, tx, key, owner); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `UPDATE rounds SET status = 'failed', error = $1
			WHERE tree_id = $2 AND branch_id = $3 AND run = $4 AND round = $5`,
			reason, key.TreeID, key.BranchID, key.Run, key.Round)
		return err
	})
	return wrap(err, "fail %s", key.String())
}
