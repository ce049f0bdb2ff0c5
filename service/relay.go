package service

import (
	"context"
	"time"

	"github.com/branchkey/branchkey"
)

// relayBatch is how many outbox messages one pass leases at a time.
const relayBatch = 100

// relayLoop publishes stored messages to every external notifier (RabbitMQ)
// in the order they were stored, and marks each sent once all confirmed it.
// While a transport is down, messages wait in the outbox and the loop tries
// again each poll interval; several replicas may run it at once, since each
// message is leased to one of them at a time. Delivery is at least once: a
// crash between a confirm and the mark sends the message again, with the
// same message_id.
func (s *Service) relayLoop(ctx context.Context) {
	every(ctx, s.cfg.PollInterval, s.relayC, func() { s.relayOnce(ctx) })
}

// relayOnce sends what is pending now and reports whether all of it went.
func (s *Service) relayOnce(ctx context.Context) bool {
	lease := max(5*s.cfg.PollInterval, 10*time.Second)
	for ctx.Err() == nil {
		now := s.now()
		msgs, err := s.store.ClaimOutbox(ctx, s.cfg.Owner, now, now.Add(lease), relayBatch)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("lease outbox messages", "err", err)
			}
			return false
		}
		if len(msgs) == 0 {
			return true
		}
		sent := make([]string, 0, len(msgs))
		failed := false
		for _, m := range msgs {
			for _, n := range s.notifiers {
				if err := n.Publish(ctx, m); err != nil {
					if isCode(err, branchkey.ENOTFOUND) {
						// The branch has no exchange: no leaf was ever
						// provisioned, so nobody can receive it there
						// (SSE still has it).
						s.log.Debug("no broker exchange for the message's branch", "message", m.ID, "branch", m.BranchID)
						continue
					}
					if ctx.Err() == nil {
						s.log.Warn("publish message; it stays in the outbox", "message", m.ID, "type", m.Type, "branch", m.BranchID, "err", err)
					}
					failed = true
					break
				}
			}
			if failed {
				break // keep the order: later messages wait too
			}
			sent = append(sent, m.ID)
		}
		if len(sent) > 0 {
			if err := s.store.MarkPublished(context.WithoutCancel(ctx), sent); err != nil {
				s.log.Error("mark messages published", "err", err)
				return false
			}
		}
		if failed {
			return false
		}
	}
	return false
}
