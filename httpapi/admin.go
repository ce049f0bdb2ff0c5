package httpapi

import (
	"bytes"
	"io"
	"net/http"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/service"
)

func (s *Server) adminRoutes() {
	m := s.mux
	const tree = "/v1/admin/trees/{tree}"
	const branch = tree + "/branches/{branch}"
	m.HandleFunc("GET /v1/admin/trees", s.admin(s.handleListTrees))
	m.HandleFunc("POST /v1/admin/trees", s.admin(s.handleCreateTree))
	m.HandleFunc("DELETE "+tree, s.admin(s.handleDeleteTree))
	m.HandleFunc("GET "+tree+"/branches", s.admin(s.handleListBranches))
	m.HandleFunc("POST "+tree+"/branches", s.admin(s.handleCreateBranch))
	m.HandleFunc("GET "+branch, s.admin(s.handleShowBranch))
	m.HandleFunc("DELETE "+branch, s.admin(s.handleDeleteBranch))
	m.HandleFunc("PUT "+branch+"/run", s.admin(s.handleSetRun))
	m.HandleFunc("GET "+branch+"/aggregations", s.admin(s.handleListAggregations))
	m.HandleFunc("GET "+branch+"/leaves", s.admin(s.handleListLeaves))
	m.HandleFunc("POST "+branch+"/leaves", s.admin(s.handleCreateLeaf))
	m.HandleFunc("DELETE "+branch+"/leaves/{name}", s.admin(s.handleDeleteLeaf))
	m.HandleFunc("PUT "+branch+"/leaves/{name}/password", s.admin(s.handleResetPassword))
}

// CreateTreeRequest is the body of POST /v1/admin/trees.
type CreateTreeRequest struct {
	ID string `json:"id"`
}

func (s *Server) handleListTrees(w http.ResponseWriter, r *http.Request) {
	ts, err := s.svc.ListTrees(r.Context())
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, ts)
}

func (s *Server) handleCreateTree(w http.ResponseWriter, r *http.Request) {
	var req CreateTreeRequest
	if err := readJSON(r.Body, &req); err != nil {
		s.error(w, r, err)
		return
	}
	t, err := s.svc.CreateTree(r.Context(), req.ID)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusCreated, t)
}

func (s *Server) handleDeleteTree(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.DeleteTree(r.Context(), r.PathValue("tree")); err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, map[string]string{"id": r.PathValue("tree"), "status": "deleted"})
}

// CreateBranchRequest is the body of POST /v1/admin/trees/{tree}/branches.
// Omitted fields take service.DefaultPolicy's values. MaxWait is a Go
// duration ("90s", "10m").
type CreateBranchRequest struct {
	ID              string            `json:"id"`
	MinUpdates      *int              `json:"min_updates,omitempty"`
	SampleSize      int               `json:"sample_size,omitempty"`
	MaxWait         string            `json:"max_wait,omitempty"`
	MinQuorum       int               `json:"min_quorum,omitempty"`
	Strategy        string            `json:"strategy,omitempty"`
	StrategyOptions map[string]string `json:"strategy_options,omitempty"`
	AllowNonFinite  bool              `json:"allow_non_finite,omitempty"`
	Paused          bool              `json:"paused,omitempty"`
}

// BranchView is a branch as the admin API shows it.
type BranchView struct {
	*branchkey.Branch
	MaxWait         string                 `json:"max_wait"`
	CurrentRound    *branchkey.Round       `json:"current_round,omitempty"`
	LastAggregation *branchkey.Aggregation `json:"last_aggregation,omitempty"`
}

func (s *Server) handleListBranches(w http.ResponseWriter, r *http.Request) {
	bs, err := s.svc.ListBranches(r.Context(), r.PathValue("tree"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	views := make([]BranchView, len(bs))
	for i, b := range bs {
		views[i] = BranchView{Branch: b, MaxWait: b.Policy.MaxWait.String()}
	}
	s.data(w, http.StatusOK, views)
}

func (s *Server) handleCreateBranch(w http.ResponseWriter, r *http.Request) {
	var req CreateBranchRequest
	if err := readJSON(r.Body, &req); err != nil {
		s.error(w, r, err)
		return
	}
	p := service.DefaultPolicy()
	if req.MinUpdates != nil {
		p.MinUpdates = *req.MinUpdates
	}
	p.SampleSize, p.MinQuorum, p.AllowNonFinite = req.SampleSize, req.MinQuorum, req.AllowNonFinite
	if req.Strategy != "" {
		p.Strategy = req.Strategy
	}
	p.StrategyOptions = req.StrategyOptions
	if req.MaxWait != "" {
		d, err := time.ParseDuration(req.MaxWait)
		if err != nil {
			s.error(w, r, branchkey.Errorf(branchkey.EINVALID, "max_wait %q is not a duration like 90s or 10m", req.MaxWait))
			return
		}
		p.MaxWait = d
	}
	b, err := s.svc.CreateBranch(r.Context(), r.PathValue("tree"), req.ID, p, req.Paused)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusCreated, BranchView{Branch: b, MaxWait: b.Policy.MaxWait.String()})
}

func (s *Server) handleShowBranch(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	b, err := s.svc.FindBranch(ctx, r.PathValue("tree"), r.PathValue("branch"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	v := BranchView{Branch: b, MaxWait: b.Policy.MaxWait.String()}
	if v.CurrentRound, err = s.svc.CurrentRound(ctx, b); err != nil {
		s.error(w, r, err)
		return
	}
	aggs, err := s.svc.ListAggregations(ctx, b.TreeID, b.ID)
	if err != nil {
		s.error(w, r, err)
		return
	}
	if len(aggs) > 0 {
		v.LastAggregation = aggs[len(aggs)-1]
	}
	s.data(w, http.StatusOK, v)
}

func (s *Server) handleDeleteBranch(w http.ResponseWriter, r *http.Request) {
	if err := s.svc.DeleteBranch(r.Context(), r.PathValue("tree"), r.PathValue("branch")); err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, map[string]string{"id": r.PathValue("branch"), "status": "deleted"})
}

// SetRunRequest is the body of PUT .../run: {"status": "start"|"pause"|"stop"}.
type SetRunRequest struct {
	Status branchkey.RunStatus `json:"status"`
}

func (s *Server) handleSetRun(w http.ResponseWriter, r *http.Request) {
	var req SetRunRequest
	if err := readJSON(r.Body, &req); err != nil {
		s.error(w, r, err)
		return
	}
	b, err := s.svc.SetRunStatus(r.Context(), r.PathValue("tree"), r.PathValue("branch"), req.Status)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, BranchView{Branch: b, MaxWait: b.Policy.MaxWait.String()})
}

func (s *Server) handleListAggregations(w http.ResponseWriter, r *http.Request) {
	aggs, err := s.svc.ListAggregations(r.Context(), r.PathValue("tree"), r.PathValue("branch"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, aggs)
}

func (s *Server) handleListLeaves(w http.ResponseWriter, r *http.Request) {
	ls, err := s.svc.ListLeaves(r.Context(), r.PathValue("tree"), r.PathValue("branch"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, ls)
}

// CreateLeafRequest is the body of POST .../leaves. Without a password one
// is generated and returned once.
type CreateLeafRequest struct {
	Name     string `json:"name"`
	Password string `json:"password,omitempty"`
}

// LeafCreated is the answer to a leaf creation or password reset: the only
// time the password is shown.
type LeafCreated struct {
	*branchkey.Leaf
	Password string `json:"password"`
}

func (s *Server) handleCreateLeaf(w http.ResponseWriter, r *http.Request) {
	var req CreateLeafRequest
	if err := readJSON(r.Body, &req); err != nil {
		s.error(w, r, err)
		return
	}
	leaf, password, err := s.svc.CreateLeaf(r.Context(), r.PathValue("tree"), r.PathValue("branch"), req.Name, req.Password)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusCreated, LeafCreated{Leaf: leaf, Password: password})
}

func (s *Server) handleDeleteLeaf(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	leaf, err := s.svc.FindLeafByName(ctx, r.PathValue("tree"), r.PathValue("branch"), r.PathValue("name"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	if err := s.svc.DeleteLeaf(ctx, leaf); err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, map[string]string{"id": leaf.ID, "name": leaf.Name, "status": "deleted"})
}

// ResetPasswordRequest is the body of PUT .../leaves/{name}/password; an
// empty password is generated.
type ResetPasswordRequest struct {
	Password string `json:"password,omitempty"`
}

func (s *Server) handleResetPassword(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	var req ResetPasswordRequest
	body, err := io.ReadAll(io.LimitReader(r.Body, maxJSONBody))
	if err != nil {
		s.error(w, r, err)
		return
	}
	if len(bytes.TrimSpace(body)) > 0 {
		if err := readJSON(bytes.NewReader(body), &req); err != nil {
			s.error(w, r, err)
			return
		}
	}
	leaf, err := s.svc.FindLeafByName(ctx, r.PathValue("tree"), r.PathValue("branch"), r.PathValue("name"))
	if err != nil {
		s.error(w, r, err)
		return
	}
	password, err := s.svc.ResetPassword(ctx, leaf, req.Password)
	if err != nil {
		s.error(w, r, err)
		return
	}
	s.data(w, http.StatusOK, LeafCreated{Leaf: leaf, Password: password})
}
