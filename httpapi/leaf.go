package httpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/service"
)

// maxJSONBody bounds small JSON bodies and the upload's data part.
const maxJSONBody = 1 << 20

// readJSON decodes a small JSON body whatever its Content-Type says (the
// published client may omit it). A body that is a JSON string holding JSON
// is decoded twice.
func readJSON(r io.Reader, v any) error {
	b, err := io.ReadAll(io.LimitReader(r, maxJSONBody+1))
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if len(b) > maxJSONBody {
		return branchkey.Errorf(branchkey.ETOOLARGE, "the JSON body is larger than %d bytes", maxJSONBody)
	}
	b = bytes.TrimSpace(b)
	if len(b) > 0 && b[0] == '"' {
		var inner string
		if err := json.Unmarshal(b, &inner); err == nil {
			b = []byte(inner)
		}
	}
	if len(b) == 0 {
		return branchkey.Errorf(branchkey.EINVALID, "the body is empty; expected a JSON object")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return branchkey.Errorf(branchkey.EINVALID, "the body is not the expected JSON: %v", err)
	}
	return nil
}

// LoginRequest is the body of PUT /v1/leaf/login.
type LoginRequest struct {
	TreeID   string `json:"tree_id"`
	BranchID string `json:"branch_id"`
}

func (s *Server) handleLogin(w http.ResponseWriter, r *http.Request) {
	name, password, ok := r.BasicAuth()
	if !ok {
		s.error(w, r, branchkey.Errorf(branchkey.EUNAUTHORIZED, "missing credentials: use HTTP Basic auth with the leaf name and password"))
		return
	}
	var req LoginRequest
	if err := readJSON(r.Body, &req); err != nil {
		s.error(w, r, err)
		return
	}
	if req.TreeID == "" || req.BranchID == "" {
		s.error(w, r, branchkey.Errorf(branchkey.EINVALID, "the login body needs tree_id and branch_id"))
		return
	}
	leaf, token, err := s.svc.Login(r.Context(), name, password, req.TreeID, req.BranchID)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusCreated, map[string]any{"id": leaf.ID, "access_token": token, "status": "logged_in",
		"expires_at": time.Now().Add(s.svc.Config().TokenTTL).UTC().Format(time.RFC3339)})
}

func (s *Server) handleLogout(w http.ResponseWriter, r *http.Request) {
	name, password, ok := r.BasicAuth()
	if !ok {
		s.error(w, r, branchkey.Errorf(branchkey.EUNAUTHORIZED, "missing credentials: use HTTP Basic auth with the leaf name and password"))
		return
	}
	leaf, err := s.svc.Logout(r.Context(), name, password)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, map[string]string{"id": leaf.ID, "status": "logged_out"})
}

// uploadData is the upload's "data" part.
type uploadData struct {
	LeafName string          `json:"leaf_name"`
	Metadata json.RawMessage `json:"metadata"`
}

// metadataText returns metadata as text: a JSON string's content, or any
// other JSON value as written.
func (d *uploadData) metadataText() string {
	if len(d.Metadata) == 0 || string(d.Metadata) == "null" {
		return ""
	}
	var s string
	if err := json.Unmarshal(d.Metadata, &s); err == nil {
		return s
	}
	return string(d.Metadata)
}

func (s *Server) handleUpload(w http.ResponseWriter, r *http.Request) {
	leaf := leafFrom(r)
	ctx := r.Context()
	max := s.svc.Config().MaxUploadBytes
	if r.ContentLength > max+maxJSONBody+64<<10 {
		s.refuseUpload(w, r, branchkey.Errorf(branchkey.ETOOLARGE, "the upload of %d bytes is larger than the %d-byte limit", r.ContentLength, max))
		return
	}
	idem := r.Header.Get("Idempotency-Key")
	if u, err := s.svc.UploadExisting(ctx, leaf, idem); err != nil {
		s.refuseUpload(w, r, err)
		return
	} else if u != nil {
		s.data(w, http.StatusCreated, map[string]string{"file_id": u.ID})
		return
	}
	mr, err := r.MultipartReader()
	if err != nil {
		s.refuseUpload(w, r, branchkey.Errorf(branchkey.EINVALID, "expected multipart/form-data with the parts \"data\" and \"file\": %v", err))
		return
	}
	var data uploadData
	upload, err := s.readParts(r, mr, leaf, &data)
	if err != nil {
		upload.Discard(ctx)
		s.refuseUpload(w, r, err)
		return
	}
	if data.LeafName != "" && data.LeafName != leaf.Name {
		upload.Discard(ctx)
		s.error(w, r, branchkey.Errorf(branchkey.EINVALID, "the data part names leaf %q, but the credentials are leaf %q's", data.LeafName, leaf.Name))
		return
	}
	u, err := upload.Record(ctx, data.metadataText(), idem)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusCreated, map[string]string{"file_id": u.ID})
}

// readParts reads the multipart body: the "data" part (in any position) and
// the "file" part, streamed into storage as it arrives.
func (s *Server) readParts(r *http.Request, mr *multipart.Reader, leaf *branchkey.Leaf, data *uploadData) (*service.Upload, error) {
	var up *service.Upload
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			return up, branchkey.Errorf(branchkey.EINVALID, "malformed multipart body: %v", err)
		}
		switch part.FormName() {
		case "data":
			if err := readJSON(part, data); err != nil {
				return up, err
			}
		case "file":
			if up != nil {
				return up, branchkey.Errorf(branchkey.EINVALID, "more than one file part")
			}
			name := path.Base(strings.ReplaceAll(part.FileName(), `\`, "/"))
			if name == "." || name == "/" {
				name = "weights.npy"
			}
			u, err := s.svc.ReceiveFile(r.Context(), leaf, name, part)
			if err != nil {
				return up, err
			}
			up = u
		default:
			if _, err := io.Copy(io.Discard, io.LimitReader(part, maxJSONBody)); err != nil {
				return up, branchkey.Errorf(branchkey.EINVALID, "malformed multipart body: %v", err)
			}
		}
		part.Close()
	}
	if up == nil {
		return up, branchkey.Errorf(branchkey.EINVALID, "the upload has no \"file\" part")
	}
	return up, nil
}

// refuseUpload answers an upload error after reading a bounded amount of
// what the client is still sending, so that it can read the answer.
func (s *Server) refuseUpload(w http.ResponseWriter, r *http.Request, err error) {
	if branchkey.ErrorCode(err) != branchkey.ETOOLARGE {
		_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, s.DrainLimit))
	}
	s.error(w, r, err)
}

func (s *Server) handleDownload(w http.ResponseWriter, r *http.Request) {
	leaf := leafFrom(r)
	f, err := s.svc.OpenFile(r.Context(), leaf, r.PathValue("id"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	defer f.Blob.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", f.ID))
	w.Header().Set("ETag", strconv.Quote(f.ID)) // files never change
	w.Header().Set("Cache-Control", "private, max-age=31536000, immutable")
	http.ServeContent(w, r, "", time.Time{}, f.Blob)
}

func (s *Server) handleRunStatus(w http.ResponseWriter, r *http.Request) {
	b, err := s.svc.RunStatus(r.Context(), leafFrom(r), r.PathValue("branch_id"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, map[string]any{"run_status": b.RunStatus, "run_number": b.RunNumber, "round": b.Round})
}

// handleEvents streams the leaf's branch's messages as Server-Sent Events,
// from the one after Last-Event-ID (or the last_event_id query parameter).
// Without one it starts where the leaf's broker queue starts: with the
// first message stored after the leaf was created (from=start replays the
// branch's whole history). Each event's id is the message's sequence
// number; its data is the JSON a broker consumer receives, plus the
// message's message_id.
func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	leaf := leafFrom(r)
	id, token, _ := r.BasicAuth()
	after := int64(0)
	since := leaf.CreatedAt
	if r.URL.Query().Get("from") == "start" {
		since = time.Time{}
	}
	last := r.Header.Get("Last-Event-ID")
	if last == "" {
		last = r.URL.Query().Get("last_event_id")
	}
	if last != "" {
		n, err := strconv.ParseInt(last, 10, 64)
		if err != nil || n < 0 {
			s.error(w, r, branchkey.Errorf(branchkey.EINVALID, "Last-Event-ID %q is not an event id", last))
			return
		}
		after, since = n, time.Time{}
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, "retry: 2000\n\n")
	if err := rc.Flush(); err != nil {
		return
	}
	hub := s.svc.Hub()
	beat := time.NewTicker(s.Heartbeat)
	defer beat.Stop()
	ctx := r.Context()
	for {
		changed := hub.Changed()
		msgs, err := hub.Messages(ctx, leaf.TreeID, leaf.BranchID, after, 100)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Error("read messages for SSE", "leaf", leaf.ID, "err", err)
			}
			return
		}
		sent := 0
		for _, m := range msgs {
			after = m.Seq
			if m.CreatedAt.Before(since) {
				continue
			}
			fmt.Fprintf(w, "id: %d\nevent: %s\ndata: %s\n\n", m.Seq, m.Type, ssePayload(m))
			sent++
		}
		if sent > 0 {
			if err := rc.Flush(); err != nil {
				return
			}
		}
		if len(msgs) == 100 {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-beat.C:
			// A logged-out or expired leaf's stream ends.
			if _, err := s.svc.Authenticate(ctx, id, token); err != nil {
				return
			}
			fmt.Fprintf(w, ": ping\n\n")
			if err := rc.Flush(); err != nil {
				return
			}
		}
	}
}

// ssePayload is a message as a broker consumer receives it, with its
// message_id, so an SSE consumer can drop duplicates as an AMQP one does.
func ssePayload(m *branchkey.Message) []byte {
	b, _ := json.Marshal(struct {
		Type string          `json:"message_type"`
		Body json.RawMessage `json:"body"`
		ID   string          `json:"message_id"`
	}{m.Type, m.Body, m.ID})
	return b
}
