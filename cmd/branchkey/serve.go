package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/file"
	"github.com/branchkey/branchkey/httpapi"
	"github.com/branchkey/branchkey/postgres"
	"github.com/branchkey/branchkey/rabbitmq"
	"github.com/branchkey/branchkey/s3"
	"github.com/branchkey/branchkey/service"
	"github.com/branchkey/branchkey/sqlite"
	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Config is the server's configuration. Every field is a flag of
// "branchkey serve", a BRANCHKEY_* environment variable (the flag name in
// upper case with '-' as '_') and a key of the optional TOML config file,
// in that order of precedence.
type Config struct {
	Addr             string
	Data             string
	Database         string
	Blobs            string
	AdminTokenFile   string
	AdminToken       string // from BRANCHKEY_ADMIN_TOKEN only, never a flag
	TokenTTL         time.Duration
	MaxUpload        string
	AMQPURL          string
	RabbitMQAdminURL string
	ClaimLease       time.Duration
	PollInterval     time.Duration
	LogLevel         string
	LogFormat        string
	ShutdownTimeout  time.Duration
	PprofAddr        string
}

// DefaultConfig returns the embedded defaults: SQLite and files under
// ./branchkey-data, no broker, on 127.0.0.1:8080.
func DefaultConfig() Config {
	return Config{
		Addr:            "127.0.0.1:8080",
		Data:            "./branchkey-data",
		TokenTTL:        24 * time.Hour,
		MaxUpload:       "4GiB",
		ClaimLease:      time.Minute,
		PollInterval:    time.Second,
		LogLevel:        "info",
		LogFormat:       "json",
		ShutdownTimeout: 30 * time.Second,
	}
}

// bindFlags registers c's fields on fs.
func (c *Config) bindFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Addr, "addr", c.Addr, "address to listen on")
	fs.StringVar(&c.Data, "data", c.Data, "data directory: the SQLite database and files live here unless --database/--blobs say otherwise")
	fs.StringVar(&c.Database, "database", c.Database, "metadata store: a SQLite file path (default DATA/branchkey.db) or postgres://USER@HOST:5432/DB")
	fs.StringVar(&c.Blobs, "blobs", c.Blobs, "file store: file:///DIR (default file://DATA/blobs) or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&region=R&insecure=true (credentials from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
	fs.StringVar(&c.AdminTokenFile, "admin-token-file", c.AdminTokenFile, "file holding the admin API token (or set BRANCHKEY_ADMIN_TOKEN)")
	fs.DurationVar(&c.TokenTTL, "token-ttl", c.TokenTTL, "lifetime of a leaf's access token")
	fs.StringVar(&c.MaxUpload, "max-upload", c.MaxUpload, "largest accepted weights file (e.g. 4GiB, 500MB)")
	fs.StringVar(&c.AMQPURL, "amqp-url", c.AMQPURL, "RabbitMQ to notify leaves through, amqp://USER:PASS@HOST:5672/ (default: SSE only)")
	fs.StringVar(&c.RabbitMQAdminURL, "rabbitmq-admin-url", c.RabbitMQAdminURL, "RabbitMQ management API for provisioning leaves, http://USER:PASS@HOST:15672 (default: derived from --amqp-url)")
	fs.DurationVar(&c.ClaimLease, "claim-lease", c.ClaimLease, "how long an aggregating replica holds a round before another may take it over")
	fs.DurationVar(&c.PollInterval, "poll-interval", c.PollInterval, "how often deadlines, abandoned rounds and unsent messages are checked")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "json or text")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", c.ShutdownTimeout, "how long a graceful shutdown waits for requests in flight")
	fs.StringVar(&c.PprofAddr, "pprof-addr", c.PprofAddr, "serve Go's /debug/pprof profiles on this separate address (off by default; keep it private)")
}

// Main is the server process: its configuration, the adapters it opened
// and their lifecycle. End-to-end tests run it on 127.0.0.1:0.
type Main struct {
	Config Config
	// LogOutput receives the structured logs (default os.Stderr).
	LogOutput *os.File

	Log      *slog.Logger
	Store    branchkey.Store
	Blobs    branchkey.BlobStore
	Service  *service.Service
	notifier *rabbitmq.Notifier
	server   *http.Server
	ln       net.Listener
	cancel   context.CancelFunc
	stopping chan struct{}
	wg       sync.WaitGroup
}

// NewMain returns a Main with the default configuration.
func NewMain() *Main { return &Main{Config: DefaultConfig(), stopping: make(chan struct{})} }

// Addr returns the address the server listens on, once Run returned.
func (m *Main) Addr() string { return m.ln.Addr().String() }

// URL returns the server's base URL, once Run returned.
func (m *Main) URL() string { return "http://" + m.Addr() }

func (m *Main) logger() (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(m.Config.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level %q: %w", m.Config.LogLevel, err)
	}
	out := m.LogOutput
	if out == nil {
		out = os.Stderr
	}
	opts := &slog.HandlerOptions{Level: level}
	switch m.Config.LogFormat {
	case "json":
		return slog.New(slog.NewJSONHandler(out, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(out, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: use json or text", m.Config.LogFormat)
}

// Run opens the stores and the broker, binds the listener (so a taken port
// fails here), and starts serving and the background loops. It returns once
// the server is up; Close stops it.
func (m *Main) Run(ctx context.Context) (err error) {
	c := &m.Config
	if m.Log, err = m.logger(); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			m.Close()
		}
	}()
	maxUpload, err := humanize.ParseBytes(c.MaxUpload)
	if err != nil || maxUpload == 0 {
		return fmt.Errorf("--max-upload %q is not a size like 4GiB or 500MB", c.MaxUpload)
	}
	adminToken := c.AdminToken
	if c.AdminTokenFile != "" {
		b, err := os.ReadFile(c.AdminTokenFile)
		if err != nil {
			return fmt.Errorf("--admin-token-file: %w", err)
		}
		adminToken = strings.TrimSpace(string(b))
	}
	if adminToken != "" && len(adminToken) < 16 {
		return errors.New("the admin token is shorter than 16 characters")
	}
	if err := os.MkdirAll(c.Data, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	if m.Store, err = openStore(ctx, c); err != nil {
		return err
	}
	if m.Blobs, err = openBlobs(ctx, c); err != nil {
		return err
	}
	cfg := service.Config{TokenTTL: c.TokenTTL, MaxUploadBytes: int64(maxUpload), ClaimLease: c.ClaimLease, PollInterval: c.PollInterval}
	var opts []service.Option
	if c.AMQPURL != "" {
		broker, notifier, err := m.openRabbitMQ()
		if err != nil {
			return err
		}
		m.notifier = notifier
		opts = append(opts, service.WithBroker(broker), service.WithNotifier(notifier))
	}
	m.Service = service.New(m.Store, m.Blobs, cfg, m.Log, opts...)
	api := httpapi.New(m.Service, adminToken, m.Log)
	if m.ln, err = net.Listen("tcp", c.Addr); err != nil {
		return fmt.Errorf("listen on %s: %w", c.Addr, err)
	}
	m.server = &http.Server{
		Handler:           api,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(m.Log.Handler(), slog.LevelWarn),
	}
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	m.cancel = cancel
	m.wg.Add(2)
	go func() {
		defer m.wg.Done()
		if err := m.Service.Run(bg); err != nil {
			m.Log.Error("service stopped", "err", err)
		}
	}()
	go func() {
		defer m.wg.Done()
		if err := m.server.Serve(m.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			m.Log.Error("http server stopped", "err", err)
		}
	}()
	if c.PprofAddr != "" {
		if err := m.servePprof(c.PprofAddr); err != nil {
			return err
		}
	}
	m.Log.Info("branchkey serving", "version", branchkey.Version, "addr", m.Addr(), "data", c.Data,
		"database", m.databaseName(), "blobs", m.blobsName(), "rabbitmq", c.AMQPURL != "", "admin_api", adminToken != "")
	return nil
}

// servePprof serves the runtime profiles on their own listener, so they are
// never reachable through the public address.
func (m *Main) servePprof(addr string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--pprof-addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		<-m.stopping
		srv.Close()
	}()
	go srv.Serve(ln)
	return nil
}

func (m *Main) databaseName() string {
	if m.Config.Database != "" {
		return redact(m.Config.Database)
	}
	return filepath.Join(m.Config.Data, "branchkey.db")
}

func (m *Main) blobsName() string {
	if m.Config.Blobs != "" {
		return redact(m.Config.Blobs)
	}
	return "file://" + filepath.Join(m.Config.Data, "blobs")
}

// redact hides a URL's password in logs.
func redact(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

func openStore(ctx context.Context, c *Config) (branchkey.Store, error) {
	db := c.Database
	if db == "" {
		db = filepath.Join(c.Data, "branchkey.db")
	}
	if strings.HasPrefix(db, "postgres://") || strings.HasPrefix(db, "postgresql://") {
		s, err := postgres.Open(ctx, db)
		if err != nil {
			return nil, fmt.Errorf("open database %s: %w", redact(db), err)
		}
		return s, nil
	}
	db = strings.TrimPrefix(db, "sqlite://")
	s, err := sqlite.Open(ctx, db)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", db, err)
	}
	return s, nil
}

func openBlobs(ctx context.Context, c *Config) (branchkey.BlobStore, error) {
	spec := c.Blobs
	if spec == "" {
		spec = "file://" + filepath.Join(c.Data, "blobs")
	}
	u, err := url.Parse(spec)
	if err != nil {
		return nil, fmt.Errorf("--blobs %q: %w", spec, err)
	}
	switch u.Scheme {
	case "file":
		dir := u.Path
		if u.Host != "" && u.Host != "localhost" { // file://relative/dir
			dir = filepath.Join(u.Host, u.Path)
		}
		bs, err := file.New(dir)
		if err != nil {
			return nil, fmt.Errorf("open file store %s: %w", dir, err)
		}
		return bs, nil
	case "s3":
		cfg, err := s3.ParseURL(spec)
		if err != nil {
			return nil, fmt.Errorf("--blobs: %w", err)
		}
		bs, err := s3.New(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("open S3 store %s: %w", cfg, err)
		}
		return bs, nil
	}
	return nil, fmt.Errorf("--blobs %q: use file:///DIR or s3://BUCKET[/PREFIX]?endpoint=HOST:PORT", spec)
}

// openRabbitMQ opens the broker provisioning and the notifier.
func (m *Main) openRabbitMQ() (*rabbitmq.Broker, *rabbitmq.Notifier, error) {
	c := &m.Config
	amqpURL, err := url.Parse(c.AMQPURL)
	if err != nil || (amqpURL.Scheme != "amqp" && amqpURL.Scheme != "amqps") {
		return nil, nil, fmt.Errorf("--amqp-url %q is not an amqp:// URL", redact(c.AMQPURL))
	}
	user := "guest"
	if amqpURL.User != nil {
		user = amqpURL.User.Username()
	}
	admin := c.RabbitMQAdminURL
	if admin == "" {
		// The management plugin on the broker's host, with the same user.
		a := &url.URL{Scheme: "http", Host: amqpURL.Hostname() + ":15672", User: amqpURL.User}
		if amqpURL.Scheme == "amqps" {
			a.Scheme, a.Host = "https", amqpURL.Hostname()+":15671"
		}
		admin = a.String()
	}
	broker, err := rabbitmq.NewBroker(admin, user, rabbitmq.WithLogger(m.Log))
	if err != nil {
		return nil, nil, fmt.Errorf("--rabbitmq-admin-url: %w", err)
	}
	notifier, err := rabbitmq.NewNotifier(c.AMQPURL, m.Log)
	if err != nil {
		return nil, nil, fmt.Errorf("--amqp-url: %w", err)
	}
	return broker, notifier, nil
}

// Close shuts down gracefully: stops accepting requests and waits for those
// in flight (up to the shutdown timeout), stops the background loops, then
// closes the notifier and the database, in that order.
func (m *Main) Close() error {
	var errs []error
	if m.server != nil {
		ctx, cancel := context.WithTimeout(context.Background(), m.Config.ShutdownTimeout)
		if err := m.server.Shutdown(ctx); err != nil {
			errs = append(errs, fmt.Errorf("http shutdown: %w", err))
			m.server.Close()
		}
		cancel()
	}
	if m.cancel != nil {
		m.cancel()
	}
	select {
	case <-m.stopping:
	default:
		close(m.stopping)
	}
	m.wg.Wait()
	if m.notifier != nil {
		if err := m.notifier.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if m.Store != nil {
		if err := m.Store.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if m.Log != nil {
		m.Log.Info("branchkey stopped")
	}
	return errors.Join(errs...)
}

func newServeCmd() *cobra.Command {
	m := NewMain()
	var configFile string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the aggregation server",
		Long: `serve runs the aggregation server: the v1 leaf API, Server-Sent Events,
the admin API and the round machinery.

Defaults are embedded: SQLite and files under ./branchkey-data, notifications
over SSE, listening on 127.0.0.1:8080. Every flag can also be set with a
BRANCHKEY_* environment variable (--amqp-url is BRANCHKEY_AMQP_URL) or a key in
the TOML file given with --config (amqp-url = "amqp://..."); flags win over
the environment, which wins over the file. The admin token comes from
BRANCHKEY_ADMIN_TOKEN or --admin-token-file; without one the admin API is off.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := applyEnvAndFile(cmd.Flags(), configFile); err != nil {
				return err
			}
			m.Config.AdminToken = os.Getenv("BRANCHKEY_ADMIN_TOKEN")
			ctx := cmd.Context()
			if err := m.Run(ctx); err != nil {
				return err
			}
			<-ctx.Done()
			m.Log.Info("shutting down")
			return m.Close()
		},
	}
	m.Config.bindFlags(cmd.Flags())
	cmd.Flags().StringVar(&configFile, "config", os.Getenv("BRANCHKEY_CONFIG"), "TOML config file whose keys are flag names")
	return cmd
}
