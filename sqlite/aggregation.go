package sqlite

import (
	"context"
	"database/sql"
	"time"

	"github.com/branchkey/branchkey"
)

// aggregationColumns are the columns listAggregations reads, in order.
const aggregationColumns = `id, tree_id, branch_id, run, round, inputs, num_samples, strategy, mode,
	size, blob_key, state_key, started_at, finished_at, duration`

func insertAggregation(ctx context.Context, tx *sql.Tx, a *branchkey.Aggregation) error {
	if ok, err := exists(ctx, tx, "SELECT 1 FROM aggregations WHERE id = ?", a.ID); err != nil {
		return err
	} else if ok {
		return branchkey.Errorf(branchkey.ECONFLICT, "aggregation %q already exists", a.ID)
	}
	inputs, err := jsonList(a.Inputs)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, "INSERT INTO aggregations ("+aggregationColumns+") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
		a.ID, a.TreeID, a.BranchID, a.Run, a.Round, inputs, a.NumSamples, a.Strategy, a.Mode,
		a.Size, a.BlobKey, a.StateKey, nullTime(a.StartedAt), nullTime(a.FinishedAt), int64(a.Duration))
	return err
}

// FindAggregation returns an aggregation. ENOTFOUND.
func (s *Store) FindAggregation(ctx context.Context, id string) (*branchkey.Aggregation, error) {
	as, err := listAggregations(ctx, s.rdb, "WHERE id = ?", oldestFirst, id)
	if err != nil {
		return nil, wrap(err, "find aggregation %s", id)
	}
	if len(as) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "aggregation %q not found", id)
	}
	return as[0], nil
}

// ListAggregations returns a branch's aggregations, oldest first: by run,
// then round.
func (s *Store) ListAggregations(ctx context.Context, treeID, branchID string) ([]*branchkey.Aggregation, error) {
	as, err := listAggregations(ctx, s.rdb, "WHERE tree_id = ? AND branch_id = ?", oldestFirst, treeID, branchID)
	return as, wrap(err, "list aggregations of branch %s/%s", treeID, branchID)
}

// LatestAggregation returns a branch's newest aggregation: of its latest run,
// the latest round. ENOTFOUND.
func (s *Store) LatestAggregation(ctx context.Context, treeID, branchID string) (*branchkey.Aggregation, error) {
	as, err := listAggregations(ctx, s.rdb, "WHERE tree_id = ? AND branch_id = ?", newestOnly, treeID, branchID)
	if err != nil {
		return nil, wrap(err, "find latest aggregation of branch %s/%s", treeID, branchID)
	}
	if len(as) == 0 {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "branch %q of tree %q has no aggregation", branchID, treeID)
	}
	return as[0], nil
}

// The orders listAggregations takes.
const (
	oldestFirst = "ORDER BY run, round, finished_at"
	newestOnly  = "ORDER BY run DESC, round DESC, finished_at DESC LIMIT 1"
)

// listAggregations reads aggregations in order, oldestFirst or newestOnly.
func listAggregations(ctx context.Context, q querier, where, order string, args ...any) ([]*branchkey.Aggregation, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+aggregationColumns+" FROM aggregations "+where+" "+order, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Aggregation
	for rows.Next() {
		var a branchkey.Aggregation
		var inputs string
		var started, finished sql.NullString
		var duration int64
		if err := rows.Scan(&a.ID, &a.TreeID, &a.BranchID, &a.Run, &a.Round, &inputs, &a.NumSamples,
			&a.Strategy, &a.Mode, &a.Size, &a.BlobKey, &a.StateKey, &started, &finished, &duration); err != nil {
			return nil, err
		}
		a.Duration = time.Duration(duration)
		if a.Inputs, err = parseList(inputs); err != nil {
			return nil, err
		}
		if a.StartedAt, err = parseTime(started); err != nil {
			return nil, err
		}
		if a.FinishedAt, err = parseTime(finished); err != nil {
			return nil, err
		}
		out = append(out, &a)
	}
	return out, rows.Err()
}
