package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/google/uuid"
)

// Triggers recorded when a round closes.
const (
	TriggerMinUpdates = "min_updates"
	TriggerMaxWait    = "max_wait"
)

// roundAcc is a round's running accumulator on this node: updates fold in
// as they are recorded, so that when the round closes its aggregate is
// ready without reading the updates again. It is only used when it holds
// exactly the round's chosen inputs; otherwise the round aggregates from
// the blob store.
type roundAcc struct {
	mu      sync.Mutex
	acc     accumulator
	aux     *aux
	ids     map[string]bool
	spoiled bool
	pending sync.WaitGroup
	queued  atomic.Int32 // folds queued or running
}

// spoil gives up on the accumulator (an update was replaced or removed) and
// frees its memory.
func (a *roundAcc) spoil(s *Service) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.drop(s)
}

// drop frees the accumulator; a.mu is held.
func (a *roundAcc) drop(s *Service) {
	a.spoiled = true
	a.acc = nil
	if a.aux != nil {
		a.aux.close(s, context.Background())
		a.aux = nil
	}
}

// fold adds a recorded update to its round's accumulator, in the
// background, when the branch's strategy can run incrementally.
func (s *Service) fold(b *branchkey.Branch, key branchkey.RoundKey, u *branchkey.Update) {
	if !incrementalOK(b.Policy) {
		return
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return
	}
	a := s.accs[key]
	if a == nil {
		a = &roundAcc{ids: map[string]bool{}}
		s.accs[key] = a
	}
	a.pending.Add(1)
	a.queued.Add(1)
	s.aggWG.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.aggWG.Done()
		defer a.pending.Done()
		defer a.queued.Add(-1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*opTimeout)
		defer cancel()
		a.mu.Lock()
		defer a.mu.Unlock()
		if a.spoiled {
			return
		}
		err := s.foldOne(ctx, a, b, u)
		if err != nil {
			a.drop(s)
			s.log.Warn("fold update into the round's accumulator; the round will aggregate from storage", "update", u.ID, "err", err)
			return
		}
		a.ids[u.ID] = true
	}()
}

func (s *Service) foldOne(ctx context.Context, a *roundAcc, b *branchkey.Branch, u *branchkey.Update) error {
	blob, err := s.blobs.Open(ctx, u.BlobKey)
	if err != nil {
		return err
	}
	defer blob.Close()
	if a.acc == nil {
		acc, x, err := s.newAccumulator(ctx, b, u)
		if err != nil {
			return err
		}
		a.acc, a.aux = acc, x
	}
	return a.acc.Add(ctx, s.input(u, blob))
}

// takeAcc returns the round's accumulator if it holds exactly inputs, and
// forgets it either way. The caller closes the returned accumulator's aux.
func (s *Service) takeAcc(key branchkey.RoundKey, inputs []string) *roundAcc {
	s.mu.Lock()
	a := s.accs[key]
	delete(s.accs, key)
	s.mu.Unlock()
	if a == nil {
		return nil
	}
	a.pending.Wait()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.spoiled || a.acc == nil || len(a.ids) != len(inputs) {
		a.drop(s)
		return nil
	}
	for _, id := range inputs {
		if !a.ids[id] {
			a.drop(s)
			return nil
		}
	}
	return a
}

// forgetAccs drops the accumulators of rounds that match.
func (s *Service) forgetAccs(match func(branchkey.RoundKey) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, a := range s.accs {
		if match(k) {
			a.spoil(s)
			delete(s.accs, k)
		}
	}
}

// dropStaleAccs frees the accumulators of rounds that are no longer open
// and that this process is not aggregating: rounds another replica closed,
// stopped runs, deleted branches.
func (s *Service) dropStaleAccs(held []branchkey.RoundKey, open []*branchkey.Round) {
	isOpen := make(map[branchkey.RoundKey]bool, len(open))
	for _, r := range open {
		isOpen[r.RoundKey] = true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range held {
		a := s.accs[k]
		if a != nil && !isOpen[k] && !s.aggregating[k] && a.idle() {
			a.spoil(s)
			delete(s.accs, k)
		}
	}
}

// idle reports whether no fold is under way or queued.
func (a *roundAcc) idle() bool {
	if !a.mu.TryLock() {
		return false
	}
	defer a.mu.Unlock()
	return a.queued.Load() == 0
}

// maybeClose closes a round whose min_updates is reached.
func (s *Service) maybeClose(ctx context.Context, b *branchkey.Branch, r *branchkey.Round) {
	if r.Status == branchkey.RoundOpen && r.Count >= b.Policy.MinUpdates {
		s.closeRound(ctx, b, r.RoundKey, TriggerMinUpdates)
	}
}

// closeRound closes a round, fixing its inputs (a uniform sample when the
// policy asks for one), and starts aggregating it. Only one caller, on any
// replica, closes a round; the others do nothing.
func (s *Service) closeRound(ctx context.Context, b *branchkey.Branch, key branchkey.RoundKey, trigger string) {
	pick := func(ups []*branchkey.Update) ([]string, error) {
		ids := make([]string, len(ups))
		for i, u := range ups {
			ids[i] = u.ID
		}
		if k := b.Policy.SampleSize; k > 0 && k < len(ids) {
			chosen := make([]string, 0, k)
			for _, i := range sample(len(ids), k) {
				chosen = append(chosen, ids[i])
			}
			ids = chosen
		}
		return ids, nil
	}
	r, err := s.store.CloseRound(ctx, key, trigger, pick)
	if isCode(err, branchkey.ECONFLICT) {
		return
	} else if err != nil {
		s.log.Error("close round", "round", key, "err", err)
		return
	}
	s.log.Info("round closed", "tree", key.TreeID, "branch", key.BranchID, "run", key.Run, "round", key.Round,
		"trigger", trigger, "updates", r.Count, "inputs", len(r.Inputs))
	s.startAggregation(key)
}

// startAggregation aggregates a closed round in the background unless this
// process already is.
func (s *Service) startAggregation(key branchkey.RoundKey) {
	s.mu.Lock()
	if s.closing || s.aggregating[key] {
		s.mu.Unlock()
		return
	}
	s.aggregating[key] = true
	s.aggWG.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.aggWG.Done()
		defer func() {
			s.mu.Lock()
			delete(s.aggregating, key)
			s.mu.Unlock()
		}()
		if err := s.aggregateRound(context.Background(), key); err != nil {
			s.log.Error("aggregate round", "round", key, "err", err)
		}
	}()
}

// errLostClaim stops an aggregation whose claim another replica took over.
var errLostClaim = errors.New("the round's claim was lost")

// aggregateRound claims a closed round, aggregates its inputs, stores the
// aggregate, and records the aggregation with its message in one
// transaction. If the claim is lost meanwhile, the work is thrown away.
func (s *Service) aggregateRound(ctx context.Context, key branchkey.RoundKey) error {
	owner := s.cfg.Owner
	now := s.now()
	r, err := s.store.ClaimRound(ctx, key, owner, now, now.Add(s.cfg.ClaimLease))
	if isCode(err, branchkey.ECONFLICT) || isCode(err, branchkey.ENOTFOUND) {
		return nil
	} else if err != nil {
		return fmt.Errorf("claim: %w", err)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		t := time.NewTicker(s.cfg.ClaimLease / 3)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				now := s.now()
				if _, err := s.store.ClaimRound(ctx, key, owner, now, now.Add(s.cfg.ClaimLease)); err != nil && ctx.Err() == nil {
					s.log.Warn("renew round claim", "round", key, "err", err)
					if isCode(err, branchkey.ECONFLICT) {
						cancel(errLostClaim)
						return
					}
				}
			}
		}
	}()
	defer func() { cancel(nil); <-renewed }()

	b, err := s.store.FindBranch(ctx, key.TreeID, key.BranchID)
	if err != nil {
		return fmt.Errorf("branch: %w", err)
	}
	start := s.now()
	aggID := uuid.NewString()
	agg := &branchkey.Aggregation{
		ID: aggID, TreeID: key.TreeID, BranchID: key.BranchID, Run: key.Run, Round: key.Round,
		Inputs: r.Inputs, Strategy: b.Policy.Strategy, StartedAt: start,
		BlobKey: fmt.Sprintf("aggregates/%s/%s/%s.npy", key.TreeID, key.BranchID, aggID),
	}
	out, err := s.runEngine(ctx, b, r, agg)
	if err != nil {
		if errors.Is(context.Cause(ctx), errLostClaim) {
			return nil
		}
		var de *branchkey.Error
		if errors.As(err, &de) && de.Code == branchkey.EINVALID {
			// The inputs cannot be aggregated: retrying will not help.
			s.log.Error("round failed", "round", key, "err", err)
			if ferr := s.store.FailRound(context.WithoutCancel(ctx), key, owner, de.Message); ferr != nil {
				s.log.Error("record failed round", "round", key, "err", ferr)
			}
			return nil
		}
		return err // transient: the claim expires and the round is retried
	}
	agg.FinishedAt = s.now()
	agg.Duration = agg.FinishedAt.Sub(start)
	body, _ := json.Marshal(map[string]any{
		"aggregation_id": agg.ID, "tree_id": key.TreeID, "branch_id": key.BranchID, "run": key.Run, "round": key.Round,
		"num_samples": agg.NumSamples, "updates": len(agg.Inputs), "strategy": agg.Strategy,
	})
	msg := &branchkey.Message{ID: uuid.NewString(), TreeID: key.TreeID, BranchID: key.BranchID, Type: branchkey.MessageAggregationStatus, Body: body, CreatedAt: agg.FinishedAt}
	if err := s.store.FinishRound(context.WithoutCancel(ctx), agg, owner, []*branchkey.Message{msg}); err != nil {
		s.deleteBlobs(ctx, []string{agg.BlobKey, agg.StateKey})
		if isCode(err, branchkey.ECONFLICT) {
			s.log.Warn("round finished elsewhere; aggregate discarded", "round", key)
			return nil
		}
		return fmt.Errorf("finish: %w", err)
	}
	s.log.Info("round aggregated", "tree", key.TreeID, "branch", key.BranchID, "run", key.Run, "round", key.Round,
		"aggregation", agg.ID, "updates", len(agg.Inputs), "num_samples", agg.NumSamples, "strategy", agg.Strategy,
		"mode", agg.Mode, "bytes", agg.Size, "seconds", agg.Duration.Seconds(), "engine_gbps", out.gbps)
	s.messagesStored()
	return nil
}

// roundsLoop fires deadline triggers, catches min_updates triggers a crash
// interrupted, and aggregates closed rounds nobody holds.
func (s *Service) roundsLoop(ctx context.Context) {
	every(ctx, s.cfg.PollInterval, nil, func() { s.checkRounds(ctx) })
}

func (s *Service) checkRounds(ctx context.Context) {
	now := s.now()
	pending, err := s.store.PendingRounds(ctx, now)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("list pending rounds", "err", err)
		}
		return
	}
	for _, r := range pending {
		s.startAggregation(r.RoundKey)
	}
	// Snapshot the accumulators before listing open rounds: a round whose
	// accumulator exists was recorded before the listing, so it is listed
	// if it is still open.
	s.mu.Lock()
	held := make([]branchkey.RoundKey, 0, len(s.accs))
	for k := range s.accs {
		held = append(held, k)
	}
	s.mu.Unlock()
	open, err := s.store.OpenRounds(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Error("list open rounds", "err", err)
		}
		return
	}
	s.dropStaleAccs(held, open)
	branches := map[[2]string]*branchkey.Branch{}
	for _, r := range open {
		bk := [2]string{r.TreeID, r.BranchID}
		b, ok := branches[bk]
		if !ok {
			if b, err = s.store.FindBranch(ctx, r.TreeID, r.BranchID); err != nil {
				continue
			}
			branches[bk] = b
		}
		if b.RunStatus != branchkey.RunStarted || b.RunNumber != r.Run || b.Round != r.Round {
			continue
		}
		switch {
		case r.Count >= b.Policy.MinUpdates:
			s.closeRound(ctx, b, r.RoundKey, TriggerMinUpdates)
		case b.Policy.MaxWait > 0 && r.Count >= max(b.Policy.MinQuorum, 1) && !r.FirstUpdateAt.IsZero() && !now.Before(r.FirstUpdateAt.Add(b.Policy.MaxWait)):
			s.closeRound(ctx, b, r.RoundKey, TriggerMaxWait)
		}
	}
}
