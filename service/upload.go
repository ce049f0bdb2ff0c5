package service

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/weights"
	"github.com/google/uuid"
)

// Upload is a received and validated weights file, durable in the blob
// store but not yet part of a round. Record it or Discard it.
type Upload struct {
	s       *Service
	leaf    *branchkey.Leaf
	branch  *branchkey.Branch
	update  *branchkey.Update
	tensors []weights.Tensor
	done    bool
}

// errTooLarge is returned by limitedReader past its limit.
var errTooLarge = errors.New("upload larger than the limit")

// limitedReader fails with errTooLarge once more than n bytes were read.
type limitedReader struct {
	r io.Reader
	n int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.n < 0 {
		return 0, errTooLarge
	}
	if int64(len(p)) > l.n+1 {
		p = p[:l.n+1]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		return n, errTooLarge
	}
	return n, err
}

// UploadExisting returns the leaf's update recorded under an idempotency
// key, if a retried upload already succeeded, or nil.
func (s *Service) UploadExisting(ctx context.Context, leaf *branchkey.Leaf, idempotencyKey string) (*branchkey.Update, error) {
	if idempotencyKey == "" {
		return nil, nil
	}
	u, err := s.store.FindUpdateByKey(ctx, leaf.ID, idempotencyKey)
	if isCode(err, branchkey.ENOTFOUND) {
		return nil, nil
	}
	return u, err
}

// ReceiveFile streams a leaf's weights file into the blob store while
// validating it with the codec in the same pass: structure, limits, and
// (unless the branch allows them) no NaN or Inf. It returns once the bytes
// are durable.
//
// Errors: ECONFLICT when the branch's run is not started, ETOOLARGE past
// the size limit, EINVALID for a malformed file (the message says where).
func (s *Service) ReceiveFile(ctx context.Context, leaf *branchkey.Leaf, filename string, r io.Reader) (*Upload, error) {
	b, err := s.store.FindBranch(ctx, leaf.TreeID, leaf.BranchID)
	if err != nil {
		return nil, err
	}
	if b.RunStatus != branchkey.RunStarted {
		return nil, errRunNotStarted(b)
	}
	id := uuid.NewString()
	key := fmt.Sprintf("updates/%s/%s/%s.npy", b.TreeID, b.ID, id)
	w, err := s.blobs.Create(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("create blob %s: %w", key, err)
	}
	committed := false
	defer func() {
		if !committed {
			_ = w.Abort()
		}
	}()
	lr := &limitedReader{r: r, n: s.cfg.MaxUploadBytes}
	var visit weights.Visitor
	if !b.Policy.AllowNonFinite {
		visit = func(i int, t *weights.Tensor, chunk []byte) error {
			if k := t.DType.NonFinite(chunk); k >= 0 {
				return branchkey.Errorf(branchkey.EINVALID, "file %s: tensor %d %s holds NaN or Inf; branch %s refuses non-finite values", filename, i, t.ShapeString(), b.ID)
			}
			return nil
		}
	}
	u, err := weights.Scan(io.TeeReader(lr, w), visit)
	switch {
	case errors.Is(err, errTooLarge):
		return nil, branchkey.Errorf(branchkey.ETOOLARGE, "file %s is larger than the %d-byte upload limit", filename, s.cfg.MaxUploadBytes)
	case weights.AsError(err) != nil:
		return nil, branchkey.Errorf(branchkey.EINVALID, "file %s is not a valid weights file: %v", filename, err)
	case err != nil:
		var de *branchkey.Error
		if errors.As(err, &de) {
			return nil, err
		}
		return nil, fmt.Errorf("receive file %s: %w", filename, err)
	}
	if err := w.Commit(); err != nil {
		return nil, fmt.Errorf("store file %s: %w", key, err)
	}
	committed = true
	up := &Upload{s: s, leaf: leaf, branch: b, tensors: u.Tensors}
	up.update = &branchkey.Update{
		ID: id, TreeID: b.TreeID, BranchID: b.ID, LeafID: leaf.ID,
		NumSamples: u.NumSamples, Size: u.Size, BlobKey: key, Signature: u.Signature(),
		Filename: filename, CreatedAt: s.now(),
	}
	return up, nil
}

func errRunNotStarted(b *branchkey.Branch) error {
	state := map[branchkey.RunStatus]string{branchkey.RunPaused: "paused", branchkey.RunStopped: "stopped"}[b.RunStatus]
	return branchkey.Errorf(branchkey.ECONFLICT, "the run of branch %s is %s; uploads are accepted while it is started", b.ID, state)
}

// Discard deletes a received file that will not be recorded.
func (up *Upload) Discard(ctx context.Context) {
	if up == nil || up.done {
		return
	}
	up.done = true
	up.s.deleteBlobs(ctx, []string{up.update.BlobKey})
}

// Record puts the upload into its branch's open round, replacing the leaf's
// earlier update of that round, and closes the round if its policy says so.
// The file must match the round's first update (tensor count, shapes, dtype
// kinds). A retry with the same idempotency key returns the first update.
//
// Errors: EINVALID when the file does not match the round, ECONFLICT when
// the run is no longer started.
func (up *Upload) Record(ctx context.Context, metadata, idempotencyKey string) (*branchkey.Update, error) {
	if up.done {
		return nil, fmt.Errorf("upload %s already recorded or discarded", up.update.ID)
	}
	up.done = true
	s := up.s
	u := up.update
	u.Metadata = metadata
	u.IdempotencyKey = idempotencyKey
	check := func(r *branchkey.Round) error {
		if r.Signature == "" {
			return nil
		}
		want, err := weights.ParseSignature(r.Signature)
		if err != nil {
			return fmt.Errorf("round %d signature: %w", r.Round, err)
		}
		if msg := weights.Compare(want, up.tensors); msg != "" {
			return branchkey.Errorf(branchkey.EINVALID, "file %s does not match round %d's first update: %s", u.Filename, r.Round, msg)
		}
		return nil
	}
	res, err := s.store.PutUpdate(ctx, u, check)
	if err != nil {
		s.deleteBlobs(ctx, []string{u.BlobKey})
		return nil, err
	}
	if res.Existing != nil {
		s.deleteBlobs(ctx, []string{u.BlobKey})
		return res.Existing, nil
	}
	key := u.RoundKey()
	if res.Replaced != nil {
		s.mu.Lock()
		if a := s.accs[key]; a != nil {
			a.spoil(s) // an update cannot be taken back out of a running sum
		}
		s.mu.Unlock()
		s.deleteBlobs(ctx, []string{res.Replaced.BlobKey})
	}
	s.log.Info("update recorded", "update", u.ID, "leaf", u.LeafID, "tree", u.TreeID, "branch", u.BranchID,
		"run", u.Run, "round", u.Round, "num_samples", u.NumSamples, "bytes", u.Size, "round_count", res.Round.Count)
	s.fold(up.branch, key, u)
	s.maybeClose(ctx, up.branch, res.Round)
	return u, nil
}
