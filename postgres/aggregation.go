package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/branchkey/branchkey"
)

// aggregationColumns are the columns listAggregations reads, in order.
const aggregationColumns = `id, tree_id, branch_id, run, round, inputs, num_samples, strategy, mode,
	size, blob_key, state_key, started_at, finished_at, duration`

func insertAggregation(ctx context.Context, tx pgx.Tx, a *branchkey.Aggregation) error {
	tag, err := tx.Exec(ctx, "INSERT INTO aggregations ("+aggregationColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON CONFLICT (id) DO NOTHING`,
		a.ID, a.TreeID, a.BranchID, a.Run, a.Round, list(a.Inputs), a.NumSamples, a.Strategy, a.Mode,
		a.Size, a.BlobKey, a.StateKey, nullTime(a.StartedAt), nullTime(a.FinishedAt), int64(a.Duration))
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return branchkey.Errorf(branchkey.ECONFLICT, "aggregation %q already exists", a.ID)
	}
	return nil
}

// FindAggregation returns an aggregation. ENOTFOUND.
func (s *Store) FindAggregation(ctx context.Context, id string) (*branchkey.Aggregation, error) {
	var as []*branchkey.Aggregation
	err := s.read(ctx, func(q querier) (err error) {
		if storable(id) {
			as, err = listAggregations(ctx, q, "WHERE id = $1", oldestFirst, id)
		}
		return err
	})
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
	var as []*branchkey.Aggregation
	err := s.read(ctx, func(q querier) (err error) {
		if storable(treeID, branchID) {
			as, err = listAggregations(ctx, q, "WHERE tree_id = $1 AND branch_id = $2", oldestFirst, treeID, branchID)
		}
		return err
	})
	return as, wrap(err, "list aggregations of branch %s/%s", treeID, branchID)
}

// LatestAggregation returns a branch's newest aggregation: of its latest run,
// the latest round. ENOTFOUND.
func (s *Store) LatestAggregation(ctx context.Context, treeID, branchID string) (*branchkey.Aggregation, error) {
	var as []*branchkey.Aggregation
	err := s.read(ctx, func(q querier) (err error) {
		if storable(treeID, branchID) {
			as, err = listAggregations(ctx, q, "WHERE tree_id = $1 AND branch_id = $2", newestOnly, treeID, branchID)
		}
		return err
	})
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
	oldestFirst = "ORDER BY run, round, finished_at, id"
	newestOnly  = "ORDER BY run DESC, round DESC, finished_at DESC, id DESC LIMIT 1"
)

// listAggregations reads aggregations in order, oldestFirst or newestOnly.
func listAggregations(ctx context.Context, q querier, where, order string, args ...any) ([]*branchkey.Aggregation, error) {
	rows, err := q.Query(ctx, "SELECT "+aggregationColumns+" FROM aggregations "+where+" "+order, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (*branchkey.Aggregation, error) {
		var a branchkey.Aggregation
		var inputs []string
		var started, finished pgtype.Timestamptz
		var duration int64
		if err := row.Scan(&a.ID, &a.TreeID, &a.BranchID, &a.Run, &a.Round, &inputs, &a.NumSamples,
			&a.Strategy, &a.Mode, &a.Size, &a.BlobKey, &a.StateKey, &started, &finished, &duration); err != nil {
			return nil, err
		}
		a.Duration = time.Duration(duration)
		a.Inputs = listOf(inputs)
		a.StartedAt, a.FinishedAt = timeOf(started), timeOf(finished)
		return &a, nil
	})
}
