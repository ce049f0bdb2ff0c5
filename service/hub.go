package service

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/branchkey/branchkey"
)

// Hub is the in-process notifier behind Server-Sent Events. Messages live
// in the store; the hub only wakes subscribers when there may be new ones:
// at once for messages stored by this process, and within a poll interval
// for messages stored by other replicas.
type Hub struct {
	store branchkey.Store
	log   *slog.Logger

	mu   sync.Mutex
	wake chan struct{}
	last int64
}

func newHub(store branchkey.Store, log *slog.Logger) *Hub {
	return &Hub{store: store, log: log, wake: make(chan struct{})}
}

// Changed returns a channel closed at the next Wake. Take it before
// reading messages, so nothing stored in between is missed.
func (h *Hub) Changed() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.wake
}

// Wake wakes every subscriber.
func (h *Hub) Wake() {
	h.mu.Lock()
	defer h.mu.Unlock()
	close(h.wake)
	h.wake = make(chan struct{})
}

// Messages returns up to limit of a branch's messages after seq.
func (h *Hub) Messages(ctx context.Context, treeID, branchID string, after int64, limit int) ([]*branchkey.Message, error) {
	return h.store.ListMessages(ctx, treeID, branchID, after, limit)
}

// watch returns a loop that wakes subscribers when the store's newest
// message is newer than the last one seen, whoever stored it.
func (h *Hub) watch(interval time.Duration) func(context.Context) {
	return func(ctx context.Context) {
		every(ctx, interval, nil, func() {
			seq, err := h.store.LastMessageSeq(ctx)
			if err != nil {
				if ctx.Err() == nil {
					h.log.Warn("watch messages", "err", err)
				}
				return
			}
			h.mu.Lock()
			newer := seq > h.last
			h.last = max(h.last, seq)
			h.mu.Unlock()
			if newer {
				h.Wake()
			}
		})
	}
}
