package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"time"

	"github.com/branchkey/branchkey"
)

// messageColumns are the columns listMessages reads, in order.
const messageColumns = "seq, id, tree_id, branch_id, type, body, created_at"

// insertMessage stores m in the outbox and sets its Seq and, if it is zero,
// its CreatedAt.
func (s *Store) insertMessage(ctx context.Context, tx *sql.Tx, m *branchkey.Message) error {
	if m.ID == "" {
		return branchkey.Errorf(branchkey.EINVALID, "message id is empty")
	}
	if len(m.Body) > 0 && !json.Valid(m.Body) {
		return branchkey.Errorf(branchkey.EINVALID, "message %q has a body that is not JSON", m.ID)
	}
	if ok, err := exists(ctx, tx, "SELECT 1 FROM messages WHERE id = ?", m.ID); err != nil {
		return err
	} else if ok {
		return branchkey.Errorf(branchkey.ECONFLICT, "message %q already exists", m.ID)
	}
	created := m.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	res, err := tx.ExecContext(ctx, "INSERT INTO messages (id, tree_id, branch_id, type, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
		m.ID, m.TreeID, m.BranchID, m.Type, string(m.Body), fmtTime(created))
	if err != nil {
		return err
	}
	seq, err := res.LastInsertId()
	if err != nil {
		return err
	}
	m.Seq, m.CreatedAt = seq, created.UTC()
	return nil
}

// ListMessages returns up to limit (all if limit <= 0) of a branch's
// messages with Seq > after, by Seq.
func (s *Store) ListMessages(ctx context.Context, treeID, branchID string, after int64, limit int) ([]*branchkey.Message, error) {
	if limit <= 0 {
		limit = -1 // SQLite's "no limit"
	}
	ms, err := listMessages(ctx, s.rdb, "WHERE tree_id = ? AND branch_id = ? AND seq > ? ORDER BY seq LIMIT ?",
		treeID, branchID, after, limit)
	return ms, wrap(err, "list messages of branch %s/%s", treeID, branchID)
}

func listMessages(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Message, error) {
	rows, err := q.QueryContext(ctx, "SELECT "+messageColumns+" FROM messages "+where, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []*branchkey.Message
	for rows.Next() {
		var m branchkey.Message
		var body string
		var created sql.NullString
		if err := rows.Scan(&m.Seq, &m.ID, &m.TreeID, &m.BranchID, &m.Type, &body, &created); err != nil {
			return nil, err
		}
		if body != "" {
			m.Body = json.RawMessage(body)
		}
		if m.CreatedAt, err = parseTime(created); err != nil {
			return nil, err
		}
		out = append(out, &m)
	}
	return out, rows.Err()
}

// LastMessageSeq returns the highest Seq of any stored message, 0 if none.
func (s *Store) LastMessageSeq(ctx context.Context) (int64, error) {
	var seq int64
	err := s.rdb.QueryRowContext(ctx, "SELECT COALESCE(MAX(seq), 0) FROM messages").Scan(&seq)
	if err != nil {
		return 0, wrap(err, "read last message seq")
	}
	return seq, nil
}

// ClaimOutbox leases up to limit (all if limit <= 0) unpublished messages to
// owner until until, oldest first. Messages leased by someone else are
// skipped until their lease expires at now; owner's own leases are renewed.
// EINVALID for an empty owner.
func (s *Store) ClaimOutbox(ctx context.Context, owner string, now, until time.Time, limit int) ([]*branchkey.Message, error) {
	if owner == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "outbox lease owner is empty")
	}
	if limit <= 0 {
		limit = -1
	}
	var ms []*branchkey.Message
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		ms, err = listMessages(ctx, tx, `WHERE published_at IS NULL
			AND (lease_owner = '' OR lease_owner = ? OR lease_until IS NULL OR lease_until <= ?)
			ORDER BY seq LIMIT ?`, owner, fmtTime(now), limit)
		if err != nil || len(ms) == 0 {
			return err
		}
		ids := make([]string, len(ms))
		for i, m := range ms {
			ids[i] = m.ID
		}
		for _, part := range chunk(ids) {
			args := []any{owner, fmtTime(until)}
			for _, id := range part {
				args = append(args, id)
			}
			if _, err := tx.ExecContext(ctx, "UPDATE messages SET lease_owner = ?, lease_until = ? WHERE id IN ("+placeholders(len(part))+")", args...); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, wrap(err, "claim outbox for %s", owner)
	}
	return ms, nil
}

// MarkPublished records that the broker confirmed the messages; they leave
// the outbox. Unknown ids are ignored.
func (s *Store) MarkPublished(ctx context.Context, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	now := fmtTime(s.now())
	err := s.write(ctx, func(tx *sql.Tx) error {
		for _, part := range chunk(ids) {
			args := []any{now}
			for _, id := range part {
				args = append(args, id)
			}
			if _, err := tx.ExecContext(ctx, `UPDATE messages SET published_at = ?, lease_owner = '', lease_until = NULL
				WHERE published_at IS NULL AND id IN (`+placeholders(len(part))+")", args...); err != nil {
				return err
			}
		}
		return nil
	})
	return wrap(err, "mark %d messages published", len(ids))
}
