package postgres

import (
	"cmp"
	"context"
	"encoding/json"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/branchkey/branchkey"
)

// messageColumns are the columns listMessages reads, in order.
const messageColumns = "seq, id, tree_id, branch_id, type, body, created_at"

// insertMessages stores msgs in the outbox, in order, and sets each one's Seq
// and, if it is zero, its CreatedAt.
//
// Watchers on every replica page through the outbox by seq (ListMessages
// after the last seq they saw, LastMessageSeq to tell whether anything is
// new), so a seq must never become visible while a smaller one can still
// commit: a watcher that saw 8 would never look back for a 7 committed
// later. An identity column alone does not ensure that, since transactions
// draw their seqs in one order and may commit in another. So every
// transaction that inserts messages first takes a transaction-level advisory
// lock and holds it until it ends. The seqs are drawn under the lock, and
// PostgreSQL releases a transaction's locks only after its commit is visible
// to everyone, so the next inserter draws a larger seq only once every
// smaller one is committed or rolled back for good. Readers take no lock at
// all, and neither do ClaimOutbox and MarkPublished, which only update rows;
// a table lock (LOCK messages) would have blocked those too. The cost is
// that message inserts, a few per round and per run change, take turns;
// the lock is taken as the last step of the transaction to keep that short.
func (s *Store) insertMessages(ctx context.Context, tx pgx.Tx, msgs []*branchkey.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	for _, m := range msgs {
		if m.ID == "" {
			return branchkey.Errorf(branchkey.EINVALID, "message id is empty")
		}
		if len(m.Body) > 0 && !json.Valid(m.Body) {
			return branchkey.Errorf(branchkey.EINVALID, "message %q has a body that is not JSON", m.ID)
		}
		if err := checkText("message id", m.ID, "message type", m.Type, "message body", string(m.Body)); err != nil {
			return err
		}
	}
	if err := s.lock(ctx, tx, lockMessages); err != nil {
		return err
	}
	for _, m := range msgs {
		created := m.CreatedAt
		if created.IsZero() {
			created = s.now()
		}
		var seq int64
		err := tx.QueryRow(ctx, `INSERT INTO messages (id, tree_id, branch_id, type, body, created_at)
			VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING RETURNING seq`,
			m.ID, m.TreeID, m.BranchID, m.Type, string(m.Body), created).Scan(&seq)
		if errNoRows(err) {
			return branchkey.Errorf(branchkey.ECONFLICT, "message %q already exists", m.ID)
		} else if err != nil {
			return err
		}
		m.Seq, m.CreatedAt = seq, stored(created)
	}
	return nil
}

// ListMessages returns up to limit (all if limit <= 0) of a branch's
// messages with Seq > after, by Seq. It never returns a message while one
// with a smaller Seq can still be stored: see insertMessages.
func (s *Store) ListMessages(ctx context.Context, treeID, branchID string, after int64, limit int) ([]*branchkey.Message, error) {
	var ms []*branchkey.Message
	err := s.read(ctx, func(q querier) (err error) {
		if storable(treeID, branchID) {
			ms, err = listMessages(ctx, q, "WHERE tree_id = $1 AND branch_id = $2 AND seq > $3 ORDER BY seq LIMIT $4",
				treeID, branchID, after, limitOf(limit))
		}
		return err
	})
	return ms, wrap(err, "list messages of branch %s/%s", treeID, branchID)
}

func listMessages(ctx context.Context, q querier, where string, args ...any) ([]*branchkey.Message, error) {
	rows, err := q.Query(ctx, "SELECT "+messageColumns+" FROM messages "+where, args...)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, scanMessage)
}

func scanMessage(row pgx.CollectableRow) (*branchkey.Message, error) {
	var m branchkey.Message
	var body string
	if err := row.Scan(&m.Seq, &m.ID, &m.TreeID, &m.BranchID, &m.Type, &body, &m.CreatedAt); err != nil {
		return nil, err
	}
	if body != "" {
		m.Body = json.RawMessage(body)
	}
	m.CreatedAt = m.CreatedAt.UTC()
	return &m, nil
}

// LastMessageSeq returns the highest Seq of any stored message, 0 if none.
// No message with a smaller Seq can be stored after it is read: see
// insertMessages.
func (s *Store) LastMessageSeq(ctx context.Context) (int64, error) {
	var seq int64
	err := s.read(ctx, func(q querier) error {
		return q.QueryRow(ctx, "SELECT COALESCE(MAX(seq), 0) FROM messages").Scan(&seq)
	})
	if err != nil {
		return 0, wrap(err, "read last message seq")
	}
	return seq, nil
}

// ClaimOutbox leases up to limit (all if limit <= 0) unpublished messages to
// owner until until, oldest first. Messages leased by someone else are
// skipped until their lease expires at now; owner's own leases are renewed.
//
// The messages are picked FOR UPDATE SKIP LOCKED: relays on several replicas
// claim at once without waiting for each other, each getting messages no
// other claim in flight holds, and a message whose row another claim just
// leased is re-checked against the lease and skipped. So while a lease
// holds, no other owner is handed the message. EINVALID for an empty owner.
func (s *Store) ClaimOutbox(ctx context.Context, owner string, now, until time.Time, limit int) ([]*branchkey.Message, error) {
	if owner == "" {
		return nil, branchkey.Errorf(branchkey.EINVALID, "outbox lease owner is empty")
	}
	if err := checkText("outbox lease owner", owner); err != nil {
		return nil, err
	}
	var ms []*branchkey.Message
	err := s.write(ctx, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `WITH picked AS (
				SELECT seq FROM messages
				WHERE published_at IS NULL
				AND (lease_owner = '' OR lease_owner = $1 OR lease_until IS NULL OR lease_until <= $2)
				ORDER BY seq LIMIT $4
				FOR UPDATE SKIP LOCKED
			)
			UPDATE messages m SET lease_owner = $1, lease_until = $3
			FROM picked WHERE m.seq = picked.seq
			RETURNING m.seq, m.id, m.tree_id, m.branch_id, m.type, m.body, m.created_at`,
			owner, now, until, limitOf(limit))
		if err != nil {
			return err
		}
		ms, err = pgx.CollectRows(rows, scanMessage)
		return err
	})
	if err != nil {
		return nil, wrap(err, "claim outbox for %s", owner)
	}
	// RETURNING has no order of its own.
	slices.SortFunc(ms, func(a, b *branchkey.Message) int { return cmp.Compare(a.Seq, b.Seq) })
	return ms, nil
}

// MarkPublished records that the broker confirmed the messages; they leave
// the outbox. Unknown ids are ignored.
func (s *Store) MarkPublished(ctx context.Context, ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	valid := make([]string, 0, len(ids))
	for _, id := range ids {
		if storable(id) {
			valid = append(valid, id)
		}
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE messages SET published_at = $1, lease_owner = '', lease_until = NULL
			WHERE published_at IS NULL AND id = ANY($2)`, s.now(), valid)
		return err
	})
	return wrap(err, "mark %d messages published", len(ids))
}
