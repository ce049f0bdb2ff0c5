package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"time"

	"github.com/branchkey/branchkey"
)

// CreateToken records an access token by its hash, setting CreatedAt if it
// is zero. ENOTFOUND for the leaf, ECONFLICT if the hash exists.
func (s *Store) CreateToken(ctx context.Context, t *branchkey.Token) error {
	if t.Hash == "" {
		return branchkey.Errorf(branchkey.EINVALID, "token hash is empty")
	}
	created := t.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		if _, err := findLeaf(ctx, tx, t.LeafID); err != nil {
			return err
		}
		if ok, err := exists(ctx, tx, "SELECT 1 FROM tokens WHERE hash = ?", t.Hash); err != nil {
			return err
		} else if ok {
			// The hash stays out of the message: it is a credential.
			return branchkey.Errorf(branchkey.ECONFLICT, "a token with that hash already exists")
		}
		_, err := tx.ExecContext(ctx, "INSERT INTO tokens (hash, leaf_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
			t.Hash, t.LeafID, fmtTime(created), fmtTime(t.ExpiresAt))
		return err
	})
	if err != nil {
		return wrap(err, "create token for leaf %s", t.LeafID)
	}
	t.CreatedAt = created.UTC()
	return nil
}

// FindToken returns the token with that hash, expired or not. ENOTFOUND.
func (s *Store) FindToken(ctx context.Context, hash string) (*branchkey.Token, error) {
	var t branchkey.Token
	var created, expires sql.NullString
	err := s.rdb.QueryRowContext(ctx, "SELECT hash, leaf_id, created_at, expires_at FROM tokens WHERE hash = ?", hash).
		Scan(&t.Hash, &t.LeafID, &created, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "token not found")
	} else if err != nil {
		return nil, wrap(err, "find token")
	}
	if t.CreatedAt, err = parseTime(created); err != nil {
		return nil, wrap(err, "find token")
	}
	if t.ExpiresAt, err = parseTime(expires); err != nil {
		return nil, wrap(err, "find token")
	}
	return &t, nil
}

// RevokeTokens deletes every token of a leaf.
func (s *Store) RevokeTokens(ctx context.Context, leafID string) error {
	err := s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, "DELETE FROM tokens WHERE leaf_id = ?", leafID)
		return err
	})
	return wrap(err, "revoke tokens of leaf %s", leafID)
}

// DeleteExpiredTokens deletes tokens that expired before now and returns, by
// id, the leaves it left with no valid token (one expiring at now or later).
// The select and the delete share one write transaction, so concurrent
// callers each report a leaf only if they deleted its last tokens: once
// overall.
func (s *Store) DeleteExpiredTokens(ctx context.Context, now time.Time) (leaves []string, err error) {
	at := fmtTime(now)
	err = s.write(ctx, func(tx *sql.Tx) error {
		if leaves, err = scanStrings(tx.QueryContext(ctx, `SELECT DISTINCT t.leaf_id FROM tokens t
			WHERE t.expires_at < ?1
			AND NOT EXISTS (SELECT 1 FROM tokens v WHERE v.leaf_id = t.leaf_id AND v.expires_at >= ?1)
			ORDER BY 1`, at)); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, "DELETE FROM tokens WHERE expires_at < ?", at)
		return err
	})
	if err != nil {
		return nil, wrap(err, "delete expired tokens")
	}
	return leaves, nil
}
