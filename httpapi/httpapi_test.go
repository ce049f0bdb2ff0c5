package httpapi_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/branchkey/branchkey/file"
	"github.com/branchkey/branchkey/httpapi"
	"github.com/branchkey/branchkey/service"
	"github.com/branchkey/branchkey/sqlite"
)

const adminToken = "httpapi-test-admin-token"

// MustServer serves the API over a fresh SQLite store and file store.
func MustServer(tb testing.TB) (*httptest.Server, *service.Service) {
	tb.Helper()
	dir := tb.TempDir()
	st, err := sqlite.Open(context.Background(), dir+"/db")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	bs, err := file.New(dir + "/blobs")
	if err != nil {
		tb.Fatal(err)
	}
	svc := service.New(st, bs, service.Config{}, nil)
	srv := httptest.NewServer(httpapi.New(svc, adminToken, nil))
	tb.Cleanup(srv.Close)
	return srv, svc
}

func do(tb testing.TB, req *http.Request) (int, httpapi.ErrorBody) {
	tb.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	var body httpapi.ErrorBody
	json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body
}

// TestLoginBody: the published client sends the login body as a JSON string
// without a Content-Type; a JSON string holding JSON is accepted too, and
// errors carry both "message" and "error".
func TestLoginBody(t *testing.T) {
	srv, svc := MustServer(t)
	ctx := context.Background()
	if _, err := svc.CreateTree(ctx, "t"); err != nil {
		t.Fatal(err)
	}
	if _, err := svc.CreateBranch(ctx, "t", "b", service.DefaultPolicy(), false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.CreateLeaf(ctx, "t", "b", "alice", "alice-password"); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, body string
		status     int
		says       string
	}{
		{"OK", `{"tree_id": "t", "branch_id": "b"}`, 201, ""},
		{"DoubleEncoded", `"{\"tree_id\": \"t\", \"branch_id\": \"b\"}"`, 201, ""},
		{"ErrNotJSON", `tree_id=t`, 400, "not the expected JSON"},
		{"ErrEmpty", ``, 400, "empty"},
		{"ErrMissingBranch", `{"tree_id": "t"}`, 400, "tree_id and branch_id"},
		{"ErrOtherBranch", `{"tree_id": "t", "branch_id": "x"}`, 403, "belongs to tree"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest("PUT", srv.URL+"/v1/leaf/login", strings.NewReader(c.body))
			req.SetBasicAuth("alice", "alice-password")
			status, body := do(t, req)
			if status != c.status || !strings.Contains(body.Message, c.says) || body.Message != body.Error {
				t.Fatalf("%d %+v, want %d saying %q", status, body, c.status, c.says)
			}
		})
	}
}

// TestAdminAuth: the admin API needs the bearer token, and is off without
// one.
func TestAdminAuth(t *testing.T) {
	srv, svc := MustServer(t)
	for _, c := range []struct {
		name, auth string
		status     int
	}{
		{"OK", "Bearer " + adminToken, 200},
		{"ErrWrongToken", "Bearer nope", 401},
		{"ErrBasic", "Basic YTpi", 401},
		{"ErrNone", "", 401},
	} {
		t.Run(c.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", srv.URL+"/v1/admin/trees", nil)
			if c.auth != "" {
				req.Header.Set("Authorization", c.auth)
			}
			if status, body := do(t, req); status != c.status {
				t.Fatalf("%d %+v, want %d", status, body, c.status)
			}
		})
	}
	off := httptest.NewServer(httpapi.New(svc, "", nil))
	defer off.Close()
	req, _ := http.NewRequest("GET", off.URL+"/v1/admin/trees", nil)
	req.Header.Set("Authorization", "Bearer ")
	if status, body := do(t, req); status != 403 || !strings.Contains(body.Message, "disabled") {
		t.Fatalf("admin API without a token: %d %+v", status, body)
	}
}

// TestFileCallsNeedToken: file calls answer 401 with a JSON error and a
// WWW-Authenticate challenge.
func TestFileCallsNeedToken(t *testing.T) {
	srv, _ := MustServer(t)
	for _, path := range []string{"/v1/file/download/x", "/v1/branch/b/run", "/v1/events"} {
		req, _ := http.NewRequest("GET", srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
			t.Errorf("GET %s: %d %v", path, resp.StatusCode, resp.Header)
		}
	}
}
