package service

import (
	"context"
	"encoding/json"
	"regexp"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/aggregate"
	"github.com/google/uuid"
)

// validID matches tree and branch ids: they name RabbitMQ virtual hosts and
// exchanges and appear in paths, so letters, digits, '-', '_' and '.' only.
var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// validName matches leaf login names (HTTP Basic user names: no ':').
var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$`)

func checkID(kind, id string) error {
	if !validID.MatchString(id) {
		return branchkey.Errorf(branchkey.EINVALID, "%s id %q is not valid: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", kind, id)
	}
	return nil
}

// CreateTree creates a tree. EINVALID for a bad id, ECONFLICT if it exists.
func (s *Service) CreateTree(ctx context.Context, id string) (*branchkey.Tree, error) {
	if err := checkID("tree", id); err != nil {
		return nil, err
	}
	t := &branchkey.Tree{ID: id, CreatedAt: s.now()}
	if err := s.store.CreateTree(ctx, t); err != nil {
		return nil, err
	}
	s.log.Info("tree created", "tree", id)
	return t, nil
}

// ListTrees returns every tree.
func (s *Service) ListTrees(ctx context.Context) ([]*branchkey.Tree, error) {
	return s.store.ListTrees(ctx)
}

// DeleteTree deletes a tree and everything in it: branches, leaves, files,
// and its virtual host on the broker.
func (s *Service) DeleteTree(ctx context.Context, id string) error {
	leaves, blobs, err := s.store.DeleteTree(ctx, id)
	if err != nil {
		return err
	}
	s.forgetAccs(func(k branchkey.RoundKey) bool { return k.TreeID == id })
	if s.broker != nil {
		if err := s.broker.DeleteTree(ctx, id, leaves); err != nil {
			s.log.Error("delete tree on the broker", "tree", id, "err", err)
		}
	}
	s.deleteBlobs(ctx, blobs)
	s.log.Info("tree deleted", "tree", id, "leaves", len(leaves), "files", len(blobs))
	return nil
}

// DefaultPolicy is a new branch's policy unless told otherwise: aggregate
// with FedAvg once two leaves have uploaded (as Flower's default
// min_fit_clients), using every update.
func DefaultPolicy() branchkey.Policy {
	return branchkey.Policy{MinUpdates: 2, Strategy: "fedavg"}
}

// checkPolicy fills defaults and validates a policy, the strategy included.
func checkPolicy(p *branchkey.Policy) error {
	if p.Strategy == "" {
		p.Strategy = "fedavg"
	}
	if p.MinUpdates < 1 {
		return branchkey.Errorf(branchkey.EINVALID, "min_updates is %d; it must be at least 1", p.MinUpdates)
	}
	if p.SampleSize < 0 {
		return branchkey.Errorf(branchkey.EINVALID, "sample_size is %d; it must be 0 (all) or positive", p.SampleSize)
	}
	if p.MaxWait < 0 {
		return branchkey.Errorf(branchkey.EINVALID, "max_wait is %s; it must be 0 (none) or positive", p.MaxWait)
	}
	if p.MinQuorum < 0 {
		return branchkey.Errorf(branchkey.EINVALID, "min_quorum is %d; it must not be negative", p.MinQuorum)
	}
	if p.MaxWait > 0 && p.MinQuorum == 0 {
		p.MinQuorum = 1
	}
	if p.MinQuorum > p.MinUpdates {
		return branchkey.Errorf(branchkey.EINVALID, "min_quorum %d is more than min_updates %d", p.MinQuorum, p.MinUpdates)
	}
	if _, err := aggregate.ParseConfig(p.Strategy, p.StrategyOptions); err != nil {
		return branchkey.Errorf(branchkey.EINVALID, "strategy: %v", err)
	}
	return nil
}

// CreateBranch creates a branch in a tree with a policy; its run starts at
// once unless paused is set.
func (s *Service) CreateBranch(ctx context.Context, treeID, id string, p branchkey.Policy, paused bool) (*branchkey.Branch, error) {
	if err := checkID("branch", id); err != nil {
		return nil, err
	}
	if err := checkPolicy(&p); err != nil {
		return nil, err
	}
	b := &branchkey.Branch{TreeID: treeID, ID: id, Policy: p, RunStatus: branchkey.RunStarted, RunNumber: 1, Round: 1, CreatedAt: s.now()}
	if paused {
		b.RunStatus = branchkey.RunPaused
	}
	if err := s.store.CreateBranch(ctx, b); err != nil {
		return nil, err
	}
	s.log.Info("branch created", "tree", treeID, "branch", id, "policy", p, "run", b.RunStatus)
	return b, nil
}

// FindBranch returns a branch.
func (s *Service) FindBranch(ctx context.Context, treeID, id string) (*branchkey.Branch, error) {
	return s.store.FindBranch(ctx, treeID, id)
}

// ListBranches returns a tree's branches; ENOTFOUND for an unknown tree.
func (s *Service) ListBranches(ctx context.Context, treeID string) ([]*branchkey.Branch, error) {
	if _, err := s.store.FindTree(ctx, treeID); err != nil {
		return nil, err
	}
	return s.store.ListBranches(ctx, treeID)
}

// DeleteBranch deletes a branch, its leaves, files and broker exchange.
func (s *Service) DeleteBranch(ctx context.Context, treeID, id string) error {
	leaves, blobs, err := s.store.DeleteBranch(ctx, treeID, id)
	if err != nil {
		return err
	}
	s.forgetAccs(func(k branchkey.RoundKey) bool { return k.TreeID == treeID && k.BranchID == id })
	if s.broker != nil {
		if err := s.broker.DeleteBranch(ctx, treeID, id, leaves); err != nil {
			s.log.Error("delete branch on the broker", "tree", treeID, "branch", id, "err", err)
		}
	}
	s.deleteBlobs(ctx, blobs)
	s.log.Info("branch deleted", "tree", treeID, "branch", id, "leaves", len(leaves), "files", len(blobs))
	return nil
}

// SetRunStatus starts, pauses or stops a branch's run and tells its leaves
// with a run_status message. A start after a stop opens the next run.
func (s *Service) SetRunStatus(ctx context.Context, treeID, id string, status branchkey.RunStatus) (*branchkey.Branch, error) {
	if !status.Valid() {
		return nil, branchkey.Errorf(branchkey.EINVALID, "run status %q is not one of start, pause, stop", status)
	}
	b, err := s.store.SetRunStatus(ctx, treeID, id, status, func(b *branchkey.Branch) *branchkey.Message {
		body, _ := json.Marshal(map[string]any{"run_status": b.RunStatus, "run_number": b.RunNumber, "round": b.Round, "branch_id": b.ID})
		return &branchkey.Message{ID: uuid.NewString(), TreeID: b.TreeID, BranchID: b.ID, Type: branchkey.MessageRunStatus, Body: body, CreatedAt: s.now()}
	})
	if err != nil {
		return nil, err
	}
	if status == branchkey.RunStopped {
		s.forgetAccs(func(k branchkey.RoundKey) bool { return k.TreeID == treeID && k.BranchID == id })
	}
	s.log.Info("run status", "tree", treeID, "branch", id, "status", status, "run", b.RunNumber)
	s.messagesStored()
	return b, nil
}

// RunStatus returns a branch's run state for a leaf of that branch;
// EFORBIDDEN for another branch's.
func (s *Service) RunStatus(ctx context.Context, leaf *branchkey.Leaf, branchID string) (*branchkey.Branch, error) {
	if branchID != leaf.BranchID {
		return nil, branchkey.Errorf(branchkey.EFORBIDDEN, "branch %q is not this leaf's branch", branchID)
	}
	return s.store.FindBranch(ctx, leaf.TreeID, branchID)
}

// CreateLeaf creates a leaf in a branch. With an empty password one is
// generated; the password is returned either way (it is only shown once).
func (s *Service) CreateLeaf(ctx context.Context, treeID, branchID, name, password string) (*branchkey.Leaf, string, error) {
	if !validName.MatchString(name) {
		return nil, "", branchkey.Errorf(branchkey.EINVALID, "leaf name %q is not valid: use 1 to 128 letters, digits, '.', '_', '@', '+' or '-'", name)
	}
	if password == "" {
		password = newPassword()
	} else if len(password) < 8 {
		return nil, "", branchkey.Errorf(branchkey.EINVALID, "the password is shorter than 8 characters")
	}
	hash, err := s.HashPassword(ctx, password)
	if err != nil {
		return nil, "", err
	}
	leaf := &branchkey.Leaf{ID: uuid.NewString(), TreeID: treeID, BranchID: branchID, Name: name, PasswordHash: hash, CreatedAt: s.now()}
	if err := s.store.CreateLeaf(ctx, leaf); err != nil {
		return nil, "", err
	}
	if s.broker != nil {
		// The queue exists from the leaf's creation, so messages wait for it
		// even before its first login; login retries if this fails now.
		if err := s.broker.PrepareLeaf(ctx, treeID, branchID, leaf.ID); err != nil {
			s.log.Warn("prepare leaf queue on the broker (login will retry)", "leaf", leaf.ID, "err", err)
		}
	}
	s.log.Info("leaf created", "tree", treeID, "branch", branchID, "leaf", leaf.ID, "name", name)
	return leaf, password, nil
}

// ListLeaves returns a branch's leaves; ENOTFOUND for an unknown branch.
func (s *Service) ListLeaves(ctx context.Context, treeID, branchID string) ([]*branchkey.Leaf, error) {
	if _, err := s.store.FindBranch(ctx, treeID, branchID); err != nil {
		return nil, err
	}
	return s.store.ListLeaves(ctx, treeID, branchID)
}

// FindLeafByName returns a leaf by name, checking it is in tree and branch
// when they are given.
func (s *Service) FindLeafByName(ctx context.Context, treeID, branchID, name string) (*branchkey.Leaf, error) {
	leaf, err := s.store.FindLeafByName(ctx, name)
	if err != nil {
		return nil, err
	}
	if (treeID != "" && leaf.TreeID != treeID) || (branchID != "" && leaf.BranchID != branchID) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "leaf %q is not in tree %q, branch %q", name, treeID, branchID)
	}
	return leaf, nil
}

// DeleteLeaf deletes a leaf, its tokens, its broker user and queue, and its
// updates in open rounds.
func (s *Service) DeleteLeaf(ctx context.Context, leaf *branchkey.Leaf) error {
	blobs, err := s.store.DeleteLeaf(ctx, leaf.ID)
	if err != nil {
		return err
	}
	// Its update may be in a running accumulator: make those rounds
	// aggregate from disk.
	s.mu.Lock()
	for k, a := range s.accs {
		if k.TreeID == leaf.TreeID && k.BranchID == leaf.BranchID {
			a.spoil(s)
		}
	}
	s.mu.Unlock()
	if s.broker != nil {
		if err := s.broker.DeleteLeaf(ctx, leaf.TreeID, leaf.BranchID, leaf.ID); err != nil {
			s.log.Error("delete leaf on the broker", "leaf", leaf.ID, "err", err)
		}
	}
	s.deleteBlobs(ctx, blobs)
	s.log.Info("leaf deleted", "leaf", leaf.ID, "name", leaf.Name)
	return nil
}

// ResetPassword gives a leaf a new password (generated when empty) and
// revokes its tokens, on HTTP and on the broker.
func (s *Service) ResetPassword(ctx context.Context, leaf *branchkey.Leaf, password string) (string, error) {
	if password == "" {
		password = newPassword()
	} else if len(password) < 8 {
		return "", branchkey.Errorf(branchkey.EINVALID, "the password is shorter than 8 characters")
	}
	hash, err := s.HashPassword(ctx, password)
	if err != nil {
		return "", err
	}
	if err := s.store.SetLeafPassword(ctx, leaf.ID, hash); err != nil {
		return "", err
	}
	if s.broker != nil {
		if err := s.broker.RevokeLeaf(ctx, leaf.TreeID, leaf.ID); err != nil {
			s.log.Error("revoke broker access after a password reset", "leaf", leaf.ID, "err", err)
		}
	}
	return password, nil
}

// ListAggregations returns a branch's aggregations, oldest first.
func (s *Service) ListAggregations(ctx context.Context, treeID, branchID string) ([]*branchkey.Aggregation, error) {
	if _, err := s.store.FindBranch(ctx, treeID, branchID); err != nil {
		return nil, err
	}
	return s.store.ListAggregations(ctx, treeID, branchID)
}

// CurrentRound returns a branch's open round (a round with no update yet is
// reported as such, not as missing).
func (s *Service) CurrentRound(ctx context.Context, b *branchkey.Branch) (*branchkey.Round, error) {
	key := b.CurrentRound()
	r, err := s.store.FindRound(ctx, key)
	if isCode(err, branchkey.ENOTFOUND) {
		return &branchkey.Round{RoundKey: key, Status: branchkey.RoundOpen}, nil
	}
	return r, err
}

// deleteBlobs removes blobs whose records are gone; a failure only leaves
// garbage behind, so it is logged.
func (s *Service) deleteBlobs(ctx context.Context, keys []string) {
	for _, k := range keys {
		if k == "" {
			continue
		}
		if err := s.blobs.Delete(context.WithoutCancel(ctx), k); err != nil {
			s.log.Warn("delete file", "key", k, "err", err)
		}
	}
}

// messagesStored tells the relay and the hub that new messages are stored.
func (s *Service) messagesStored() {
	select {
	case s.relayC <- struct{}{}:
	default:
	}
	s.hub.Wake()
}

// opTimeout bounds background work that must not hang forever.
const opTimeout = 30 * time.Second
