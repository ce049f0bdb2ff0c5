// Package httpapi serves branchkey over HTTP: the v1 leaf API the published
// leaf clients speak (shared/spec/wire-v1.md), Server-Sent Events for
// notifications without a broker, the admin API behind a bearer token, and
// health endpoints.
package httpapi

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/service"
)

// Server is the HTTP handler of a branchkey server.
type Server struct {
	svc        *service.Service
	adminToken string
	log        *slog.Logger
	mux        *http.ServeMux
	// Heartbeat is how often an idle SSE stream gets a comment line and its
	// token is checked again. Default 15s.
	Heartbeat time.Duration
	// DrainLimit is how much of a refused upload's remaining body is read
	// so the client gets the answer instead of a reset. Default 64 MiB.
	DrainLimit int64
}

// New returns the handler. An empty adminToken disables the admin API.
func New(svc *service.Service, adminToken string, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{svc: svc, adminToken: adminToken, log: log.WithGroup("http"), mux: http.NewServeMux(),
		Heartbeat: 15 * time.Second, DrainLimit: 64 << 20}
	s.routes()
	return s
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /{$}", s.handleInfo)
	m.HandleFunc("GET /healthz", s.handleHealthz)
	m.HandleFunc("GET /readyz", s.handleReadyz)

	m.HandleFunc("PUT /v1/leaf/login", s.handleLogin)
	m.HandleFunc("PUT /v1/leaf/logout", s.handleLogout)
	m.HandleFunc("POST /v1/file/upload", s.leaf(s.handleUpload))
	m.HandleFunc("GET /v1/file/download/{id}", s.leaf(s.handleDownload))
	m.HandleFunc("GET /v1/branch/{branch_id}/run", s.leaf(s.handleRunStatus))
	m.HandleFunc("GET /v1/events", s.leaf(s.handleEvents))

	s.adminRoutes()
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.error(w, r, branchkey.Errorf(branchkey.ENOTFOUND, "no route for %s %s", r.Method, r.URL.Path))
	})
}

// ServeHTTP logs every request and serves it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	defer func() {
		if v := recover(); v != nil {
			s.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path, "panic", v)
			if !rec.wrote {
				s.error(rec, r, errors.New("panic"))
			}
		}
		level := slog.LevelInfo
		if r.URL.Path == "/healthz" || r.URL.Path == "/readyz" {
			level = slog.LevelDebug
		}
		s.log.Log(r.Context(), level, "request", "method", r.Method, "path", r.URL.Path, "status", rec.status,
			"bytes", rec.bytes, "seconds", time.Since(start).Seconds(), "remote", r.RemoteAddr)
	}()
	s.mux.ServeHTTP(rec, r)
}

// recorder notes the status and size of a response.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int64
	wrote  bool
}

func (r *recorder) WriteHeader(code int) {
	if !r.wrote {
		r.status, r.wrote = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	r.wrote = true
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

// Unwrap lets http.ResponseController reach Flush and deadlines.
func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// statuses maps domain error codes to HTTP statuses.
var statuses = map[string]int{
	branchkey.EINVALID:      http.StatusBadRequest,
	branchkey.EUNAUTHORIZED: http.StatusUnauthorized,
	branchkey.EFORBIDDEN:    http.StatusForbidden,
	branchkey.ENOTFOUND:     http.StatusNotFound,
	branchkey.ECONFLICT:     http.StatusConflict,
	branchkey.ETOOLARGE:     http.StatusRequestEntityTooLarge,
	branchkey.EUNAVAILABLE:  http.StatusServiceUnavailable,
	branchkey.EINTERNAL:     http.StatusInternalServerError,
}

// ErrorBody is every error response. The published client reads "message"
// from login and logout and "error" from file calls; both carry the text.
type ErrorBody struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Error   string `json:"error"`
}

// error answers with a domain error's status and message; anything else is
// logged in full and answered 500 without detail.
func (s *Server) error(w http.ResponseWriter, r *http.Request, err error) {
	code, msg := branchkey.ErrorCode(err), branchkey.ErrorMessage(err)
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		code, msg = branchkey.EUNAVAILABLE, "request cancelled"
	}
	if code == branchkey.EINTERNAL {
		s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
	}
	status, ok := statuses[code]
	if !ok {
		status = http.StatusInternalServerError
	}
	if status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="branchkey"`)
	}
	s.json(w, status, ErrorBody{Code: code, Message: msg, Error: msg})
}

func (s *Server) json(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

// data answers {"data": v}.
func (s *Server) data(w http.ResponseWriter, status int, v any) {
	s.json(w, status, map[string]any{"data": v})
}

type ctxKey int

const leafKey ctxKey = 0

// leaf authenticates a file call (Basic leaf_id:access_token) and passes the
// leaf on in the context.
func (s *Server) leaf(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id, token, _ := r.BasicAuth()
		leaf, err := s.svc.Authenticate(r.Context(), id, token)
		if err != nil {
			s.error(w, r, err)
			return
		}
		h(w, r.WithContext(context.WithValue(r.Context(), leafKey, leaf)))
	}
}

func leafFrom(r *http.Request) *branchkey.Leaf { return r.Context().Value(leafKey).(*branchkey.Leaf) }

// admin checks the admin bearer token in constant time.
func (s *Server) admin(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.adminToken == "" {
			s.error(w, r, branchkey.Errorf(branchkey.EFORBIDDEN, "the admin API is disabled: start the server with BRANCHKEY_ADMIN_TOKEN or --admin-token-file"))
			return
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(s.adminToken)) != 1 {
			s.error(w, r, branchkey.Errorf(branchkey.EUNAUTHORIZED, "missing or wrong admin token (Authorization: Bearer ...)"))
			return
		}
		h(w, r)
	}
}

func (s *Server) handleInfo(w http.ResponseWriter, r *http.Request) {
	health := "ok"
	status := http.StatusOK
	if err := s.svc.Ready(r.Context()); err != nil {
		health, status = "degraded: "+branchkey.ErrorMessage(err), http.StatusOK
	}
	s.json(w, status, map[string]any{"name": "branchkey", "version": branchkey.Version, "health": health})
}

func (s *Server) handleHealthz(w http.ResponseWriter, r *http.Request) {
	s.json(w, http.StatusOK, map[string]string{"status": "ok"})
}

func (s *Server) handleReadyz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	if err := s.svc.Ready(ctx); err != nil {
		s.log.Warn("not ready", "err", err)
		s.json(w, http.StatusServiceUnavailable, map[string]string{"status": "unavailable", "error": "the metadata store does not answer"})
		return
	}
	s.json(w, http.StatusOK, map[string]string{"status": "ready"})
}
