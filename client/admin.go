package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/branchkey/branchkey"
)

// Admin calls a branchkey server's admin API with the admin token.
type Admin struct {
	server string
	token  string
	http   *http.Client
}

// NewAdmin returns an admin API client for the server at base URL server
// ("http://127.0.0.1:8080").
func NewAdmin(server, token string, hc *http.Client) (*Admin, error) {
	u, err := url.Parse(server)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("server %q is not an http(s):// URL", server)
	}
	if hc == nil {
		hc = &http.Client{Timeout: 5 * time.Minute}
	}
	return &Admin{server: strings.TrimRight(server, "/"), token: token, http: hc}, nil
}

// do sends a JSON request and decodes the "data" of a JSON answer into out.
func (a *Admin) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.server+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.http.Do(req)
	if err != nil {
		return &Error{Code: branchkey.EUNAVAILABLE, Message: err.Error(), Err: err}
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return errorFrom(resp)
	}
	if out == nil {
		return nil
	}
	var env struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&env); err != nil {
		return fmt.Errorf("%s %s: bad answer: %w", method, path, err)
	}
	return json.Unmarshal(env.Data, out)
}

func esc(s string) string { return url.PathEscape(s) }

// CreateTree creates a tree.
func (a *Admin) CreateTree(ctx context.Context, id string) (*branchkey.Tree, error) {
	var t branchkey.Tree
	return &t, a.do(ctx, "POST", "/v1/admin/trees", map[string]string{"id": id}, &t)
}

// ListTrees lists the trees.
func (a *Admin) ListTrees(ctx context.Context) ([]*branchkey.Tree, error) {
	var ts []*branchkey.Tree
	return ts, a.do(ctx, "GET", "/v1/admin/trees", nil, &ts)
}

// DeleteTree deletes a tree and everything in it.
func (a *Admin) DeleteTree(ctx context.Context, id string) error {
	return a.do(ctx, "DELETE", "/v1/admin/trees/"+esc(id), nil, nil)
}

// BranchSpec is a new branch: its id, policy and whether its run starts
// paused. Nil MinUpdates means the server's default.
type BranchSpec struct {
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

// BranchInfo is a branch as the admin API shows it, with its current round
// and last aggregation when asked for one branch.
type BranchInfo struct {
	branchkey.Branch
	MaxWait         string                 `json:"max_wait"`
	CurrentRound    *branchkey.Round       `json:"current_round,omitempty"`
	LastAggregation *branchkey.Aggregation `json:"last_aggregation,omitempty"`
}

// CreateBranch creates a branch in a tree.
func (a *Admin) CreateBranch(ctx context.Context, treeID string, spec BranchSpec) (*BranchInfo, error) {
	var b BranchInfo
	return &b, a.do(ctx, "POST", "/v1/admin/trees/"+esc(treeID)+"/branches", spec, &b)
}

// ListBranches lists a tree's branches.
func (a *Admin) ListBranches(ctx context.Context, treeID string) ([]*BranchInfo, error) {
	var bs []*BranchInfo
	return bs, a.do(ctx, "GET", "/v1/admin/trees/"+esc(treeID)+"/branches", nil, &bs)
}

// ShowBranch returns a branch with its current round and last aggregation.
func (a *Admin) ShowBranch(ctx context.Context, treeID, branchID string) (*BranchInfo, error) {
	var b BranchInfo
	return &b, a.do(ctx, "GET", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID), nil, &b)
}

// DeleteBranch deletes a branch, its leaves and files.
func (a *Admin) DeleteBranch(ctx context.Context, treeID, branchID string) error {
	return a.do(ctx, "DELETE", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID), nil, nil)
}

// SetRun starts, pauses or stops a branch's run.
func (a *Admin) SetRun(ctx context.Context, treeID, branchID string, status branchkey.RunStatus) (*BranchInfo, error) {
	var b BranchInfo
	return &b, a.do(ctx, "PUT", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/run", map[string]any{"status": status}, &b)
}

// ListAggregations lists a branch's aggregations, oldest first.
func (a *Admin) ListAggregations(ctx context.Context, treeID, branchID string) ([]*branchkey.Aggregation, error) {
	var as []*branchkey.Aggregation
	return as, a.do(ctx, "GET", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/aggregations", nil, &as)
}

// NewLeaf is a created leaf with its password, shown this once.
type NewLeaf struct {
	branchkey.Leaf
	Password string `json:"password"`
}

// CreateLeaf creates a leaf; an empty password makes the server generate
// one.
func (a *Admin) CreateLeaf(ctx context.Context, treeID, branchID, name, password string) (*NewLeaf, error) {
	var l NewLeaf
	return &l, a.do(ctx, "POST", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/leaves",
		map[string]string{"name": name, "password": password}, &l)
}

// ListLeaves lists a branch's leaves.
func (a *Admin) ListLeaves(ctx context.Context, treeID, branchID string) ([]*branchkey.Leaf, error) {
	var ls []*branchkey.Leaf
	return ls, a.do(ctx, "GET", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/leaves", nil, &ls)
}

// DeleteLeaf deletes a leaf by name.
func (a *Admin) DeleteLeaf(ctx context.Context, treeID, branchID, name string) error {
	return a.do(ctx, "DELETE", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/leaves/"+esc(name), nil, nil)
}

// ResetPassword sets a leaf's password (generated when empty) and revokes
// its tokens.
func (a *Admin) ResetPassword(ctx context.Context, treeID, branchID, name, password string) (*NewLeaf, error) {
	var l NewLeaf
	return &l, a.do(ctx, "PUT", "/v1/admin/trees/"+esc(treeID)+"/branches/"+esc(branchID)+"/leaves/"+esc(name)+"/password",
		map[string]string{"password": password}, &l)
}
