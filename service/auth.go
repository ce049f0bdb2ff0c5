package service

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/branchkey/branchkey"
	"golang.org/x/crypto/argon2"
)

// Argon2id parameters: OWASP's recommended minimum (19 MiB, 2 passes, one
// lane), which keeps 200 simultaneous logins affordable.
const (
	argonTime    = 2
	argonMemory  = 19 * 1024
	argonThreads = 1
	argonKeyLen  = 32
	argonSaltLen = 16
)

// HashPassword returns the argon2id PHC string of a password.
func (s *Service) HashPassword(ctx context.Context, password string) (string, error) {
	if err := s.acquireHash(ctx); err != nil {
		return "", err
	}
	defer func() { <-s.hashes }()
	salt := make([]byte, argonSaltLen)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	key := argon2.IDKey([]byte(password), salt, argonTime, argonMemory, argonThreads, argonKeyLen)
	b64 := base64.RawStdEncoding
	return fmt.Sprintf("$argon2id$v=%d$m=%d,t=%d,p=%d$%s$%s", argon2.Version, argonMemory, argonTime, argonThreads,
		b64.EncodeToString(salt), b64.EncodeToString(key)), nil
}

// checkPassword compares a password with a PHC string in constant time.
func (s *Service) checkPassword(ctx context.Context, hash, password string) (bool, error) {
	parts := strings.Split(hash, "$")
	if len(parts) != 6 || parts[1] != "argon2id" {
		return false, fmt.Errorf("unsupported password hash format")
	}
	var version int
	var mem, iters uint32
	var threads uint8
	if _, err := fmt.Sscanf(parts[2], "v=%d", &version); err != nil || version != argon2.Version {
		return false, fmt.Errorf("unsupported argon2 version %q", parts[2])
	}
	if _, err := fmt.Sscanf(parts[3], "m=%d,t=%d,p=%d", &mem, &iters, &threads); err != nil {
		return false, fmt.Errorf("bad argon2 parameters %q", parts[3])
	}
	b64 := base64.RawStdEncoding
	salt, err := b64.DecodeString(parts[4])
	if err != nil {
		return false, fmt.Errorf("bad argon2 salt: %w", err)
	}
	want, err := b64.DecodeString(parts[5])
	if err != nil {
		return false, fmt.Errorf("bad argon2 key: %w", err)
	}
	if err := s.acquireHash(ctx); err != nil {
		return false, err
	}
	defer func() { <-s.hashes }()
	got := argon2.IDKey([]byte(password), salt, iters, mem, threads, uint32(len(want)))
	return subtle.ConstantTimeCompare(got, want) == 1, nil
}

func (s *Service) acquireHash(ctx context.Context) error {
	select {
	case s.hashes <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// dummyHash is checked when a leaf name is unknown, so that a login's
// timing does not tell which names exist.
var dummyHash = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$uhLAUO1mSvQe2tk3HW03G1ZPtDNeb8OFEvYe3pkFHiM"

// errBadCredentials is the one answer to a wrong name or password.
func errBadCredentials() error {
	return branchkey.Errorf(branchkey.EUNAUTHORIZED, "invalid leaf name or password")
}

// verifyLeaf checks a leaf's login name and password.
func (s *Service) verifyLeaf(ctx context.Context, name, password string) (*branchkey.Leaf, error) {
	if name == "" {
		return nil, branchkey.Errorf(branchkey.EUNAUTHORIZED, "missing credentials: use HTTP Basic auth with the leaf name and password")
	}
	leaf, err := s.store.FindLeafByName(ctx, name)
	if isCode(err, branchkey.ENOTFOUND) {
		_, _ = s.checkPassword(ctx, dummyHash, password)
		return nil, errBadCredentials()
	} else if err != nil {
		return nil, err
	}
	ok, err := s.checkPassword(ctx, leaf.PasswordHash, password)
	if err != nil {
		return nil, fmt.Errorf("check password of leaf %s: %w", leaf.ID, err)
	}
	if !ok {
		return nil, errBadCredentials()
	}
	return leaf, nil
}

// hashToken returns how a token is stored: its SHA-256, hex. Tokens have 256
// random bits, so a fast hash is enough.
func hashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Login checks a leaf's name and password and that it belongs to treeID and
// branchID, issues an access token, and, with a broker, makes the leaf's
// queue and broker user (password = the token) ready before returning.
//
// Errors: EUNAUTHORIZED for a wrong name or password, EFORBIDDEN when the
// tree or branch is not the leaf's, EUNAVAILABLE when the broker cannot be
// provisioned.
func (s *Service) Login(ctx context.Context, name, password, treeID, branchID string) (*branchkey.Leaf, string, error) {
	leaf, err := s.verifyLeaf(ctx, name, password)
	if err != nil {
		return nil, "", err
	}
	if treeID != leaf.TreeID || branchID != leaf.BranchID {
		return nil, "", branchkey.Errorf(branchkey.EFORBIDDEN, "leaf %s belongs to tree %q, branch %q; the login asked for tree %q, branch %q",
			leaf.Name, leaf.TreeID, leaf.BranchID, treeID, branchID)
	}
	token := randomHex(32)
	now := s.now()
	t := &branchkey.Token{Hash: hashToken(token), LeafID: leaf.ID, CreatedAt: now, ExpiresAt: now.Add(s.cfg.TokenTTL)}
	if err := s.store.CreateToken(ctx, t); err != nil {
		return nil, "", fmt.Errorf("create token for leaf %s: %w", leaf.ID, err)
	}
	if s.broker != nil {
		err := s.broker.PrepareLeaf(ctx, leaf.TreeID, leaf.BranchID, leaf.ID)
		if err == nil {
			err = s.broker.GrantLeaf(ctx, leaf.TreeID, leaf.ID, token)
		}
		if err != nil {
			// The client exits when its broker connection fails, so a
			// login without a ready broker side is no login.
			_ = s.store.RevokeTokens(context.WithoutCancel(ctx), leaf.ID)
			s.log.Error("provision leaf on the broker", "leaf", leaf.ID, "err", err)
			if isCode(err, branchkey.EUNAVAILABLE) {
				return nil, "", err
			}
			return nil, "", branchkey.Errorf(branchkey.EUNAVAILABLE, "the message broker could not be prepared for this leaf; retry later")
		}
	}
	s.log.Info("leaf logged in", "leaf", leaf.ID, "name", leaf.Name, "tree", leaf.TreeID, "branch", leaf.BranchID)
	return leaf, token, nil
}

// Logout checks a leaf's name and password and revokes all its tokens, on
// HTTP and on the broker (where its open connections are closed).
func (s *Service) Logout(ctx context.Context, name, password string) (*branchkey.Leaf, error) {
	leaf, err := s.verifyLeaf(ctx, name, password)
	if err != nil {
		return nil, err
	}
	if err := s.store.RevokeTokens(ctx, leaf.ID); err != nil {
		return nil, fmt.Errorf("revoke tokens of leaf %s: %w", leaf.ID, err)
	}
	if s.broker != nil {
		if err := s.broker.RevokeLeaf(ctx, leaf.TreeID, leaf.ID); err != nil {
			return nil, fmt.Errorf("revoke broker access of leaf %s: %w", leaf.ID, err)
		}
	}
	s.log.Info("leaf logged out", "leaf", leaf.ID, "name", leaf.Name)
	return leaf, nil
}

// Authenticate returns the leaf whose id and access token these are.
// EUNAUTHORIZED otherwise, with the same message whatever was wrong.
func (s *Service) Authenticate(ctx context.Context, leafID, token string) (*branchkey.Leaf, error) {
	bad := branchkey.Errorf(branchkey.EUNAUTHORIZED, "invalid or expired access token: log in again")
	if leafID == "" || token == "" {
		return nil, branchkey.Errorf(branchkey.EUNAUTHORIZED, "missing credentials: use HTTP Basic auth with the leaf id and access token from login")
	}
	t, err := s.store.FindToken(ctx, hashToken(token))
	if isCode(err, branchkey.ENOTFOUND) {
		return nil, bad
	} else if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare([]byte(t.LeafID), []byte(leafID)) != 1 || !s.now().Before(t.ExpiresAt) {
		return nil, bad
	}
	leaf, err := s.store.FindLeaf(ctx, t.LeafID)
	if isCode(err, branchkey.ENOTFOUND) {
		return nil, bad
	}
	return leaf, err
}

// tokensLoop deletes expired tokens and revokes the broker access of leaves
// left without a valid one.
func (s *Service) tokensLoop(ctx context.Context) {
	interval := s.cfg.PollInterval * 10
	every(ctx, interval, nil, func() {
		leaves, err := s.store.DeleteExpiredTokens(ctx, s.now())
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("delete expired tokens", "err", err)
			}
			return
		}
		for _, id := range leaves {
			if s.broker == nil {
				continue
			}
			leaf, err := s.store.FindLeaf(ctx, id)
			if err != nil {
				continue
			}
			if err := s.broker.RevokeLeaf(ctx, leaf.TreeID, leaf.ID); err != nil {
				s.log.Error("revoke broker access of expired leaf", "leaf", id, "err", err)
			}
		}
	})
}

// newPassword returns a generated leaf password: 24 random bytes, base64url.
func newPassword() string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return base64.RawURLEncoding.EncodeToString(b)
}
