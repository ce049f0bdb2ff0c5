package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/branchkey/branchkey"
)

// CreateToken records an access token by its hash, setting CreatedAt if it
// is zero. ENOTFOUND for the leaf, ECONFLICT if the hash exists.
func (s *Store) CreateToken(ctx context.Context, t *branchkey.Token) error {
	if t.Hash == "" {
		return branchkey.Errorf(branchkey.EINVALID, "token hash is empty")
	}
	if !storable(t.Hash) {
		// The hash stays out of the message: it is a credential.
		return branchkey.Errorf(branchkey.EINVALID, "the token hash is not valid text")
	}
	created := t.CreatedAt
	if created.IsZero() {
		created = s.now()
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		if _, err := findLeaf(ctx, tx, t.LeafID, "FOR KEY SHARE"); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `INSERT INTO tokens (hash, leaf_id, created_at, expires_at) VALUES ($1, $2, $3, $4)
			ON CONFLICT DO NOTHING`, t.Hash, t.LeafID, created, t.ExpiresAt)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return branchkey.Errorf(branchkey.ECONFLICT, "a token with that hash already exists")
		}
		return nil
	})
	if err != nil {
		return wrap(err, "create token for leaf %s", t.LeafID)
	}
	t.CreatedAt = stored(created)
	return nil
}

// FindToken returns the token with that hash, expired or not. ENOTFOUND.
func (s *Store) FindToken(ctx context.Context, hash string) (*branchkey.Token, error) {
	var tok *branchkey.Token
	err := s.read(ctx, func(q querier) error {
		tok = nil
		if !storable(hash) {
			return nil
		}
		var t branchkey.Token
		err := q.QueryRow(ctx, "SELECT hash, leaf_id, created_at, expires_at FROM tokens WHERE hash = $1", hash).
			Scan(&t.Hash, &t.LeafID, &t.CreatedAt, &t.ExpiresAt)
		if errNoRows(err) {
			return nil
		} else if err != nil {
			return err
		}
		t.CreatedAt, t.ExpiresAt = t.CreatedAt.UTC(), t.ExpiresAt.UTC()
		tok = &t
		return nil
	})
	if err != nil {
		return nil, wrap(err, "find token")
	}
	if tok == nil {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "token not found")
	}
	return tok, nil
}

// RevokeTokens deletes every token of a leaf.
func (s *Store) RevokeTokens(ctx context.Context, leafID string) error {
	if !storable(leafID) {
		return nil
	}
	err := s.write(ctx, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "DELETE FROM tokens WHERE leaf_id = $1", leafID)
		return err
	})
	return wrap(err, "revoke tokens of leaf %s", leafID)
}

// DeleteExpiredTokens deletes tokens that expired before now and returns, by
// id, the leaves it left with no valid token (one expiring at now or later).
//
// Concurrent sweeps, in this process or another, take turns on an advisory
// lock: the first deletes the expired tokens and reports their leaves, and
// the next, which reads only after the first committed, finds them gone. So
// each leaf is reported once overall.
func (s *Store) DeleteExpiredTokens(ctx context.Context, now time.Time) (leaves []string, err error) {
	err = s.write(ctx, func(tx pgx.Tx) error {
		if err := s.lock(ctx, tx, lockTokens); err != nil {
			return err
		}
		leaves, err = scanStrings(tx.Query(ctx, `WITH gone AS (
				DELETE FROM tokens WHERE expires_at < $1 RETURNING leaf_id
			)
			SELECT DISTINCT g.leaf_id FROM gone g
			WHERE NOT EXISTS (SELECT 1 FROM tokens v WHERE v.leaf_id = g.leaf_id AND v.expires_at >= $1)
			ORDER BY 1`, now))
		return err
	})
	if err != nil {
		return nil, wrap(err, "delete expired tokens")
	}
	return leaves, nil
}
