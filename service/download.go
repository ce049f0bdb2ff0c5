package service

import (
	"context"
	"fmt"
	"regexp"

	"github.com/branchkey/branchkey"
)

// validFileID matches file ids: letters, digits and '-' (wire-v1.md).
var validFileID = regexp.MustCompile(`^[A-Za-z0-9-]{1,128}$`)

// File is a downloadable weights file opened for reading.
type File struct {
	ID   string
	Blob branchkey.Blob
	// Kind is "aggregate" or "update".
	Kind string
}

// OpenFile opens a file a leaf may download: an aggregate of its own
// branch, or one of its own uploads.
//
// Errors: ENOTFOUND for an unknown id, EFORBIDDEN for another branch's
// aggregate or another leaf's upload.
func (s *Service) OpenFile(ctx context.Context, leaf *branchkey.Leaf, id string) (*File, error) {
	if !validFileID.MatchString(id) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "no file with id %q", id)
	}
	var key, kind string
	a, err := s.store.FindAggregation(ctx, id)
	switch {
	case err == nil:
		if a.TreeID != leaf.TreeID || a.BranchID != leaf.BranchID {
			return nil, branchkey.Errorf(branchkey.EFORBIDDEN, "file %s belongs to another branch", id)
		}
		key, kind = a.BlobKey, "aggregate"
	case isCode(err, branchkey.ENOTFOUND):
		u, err := s.store.FindUpdate(ctx, id)
		if isCode(err, branchkey.ENOTFOUND) {
			return nil, branchkey.Errorf(branchkey.ENOTFOUND, "no file with id %s", id)
		} else if err != nil {
			return nil, err
		}
		if u.LeafID != leaf.ID {
			return nil, branchkey.Errorf(branchkey.EFORBIDDEN, "file %s is another leaf's upload", id)
		}
		key, kind = u.BlobKey, "update"
	default:
		return nil, err
	}
	blob, err := s.blobs.Open(ctx, key)
	if isCode(err, branchkey.ENOTFOUND) {
		return nil, branchkey.Errorf(branchkey.ENOTFOUND, "file %s is no longer stored", id)
	} else if err != nil {
		return nil, fmt.Errorf("open file %s: %w", id, err)
	}
	return &File{ID: id, Blob: blob, Kind: kind}, nil
}
