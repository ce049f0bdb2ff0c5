package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/branchkey/branchkey"
	"github.com/branchkey/branchkey/client"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// leafFlags are the flags every leaf command shares.
type leafFlags struct {
	credentials string
	server      string
	json        bool
	stateDir    string
	transport   string
	progress    string
}

func newLeafCmd() *cobra.Command {
	f := &leafFlags{}
	cmd := &cobra.Command{
		Use:   "leaf",
		Short: "Act as a leaf: log in, upload, download, watch for aggregates",
		Long: `leaf does what a training site's client does, from any script: log in and out,
upload a weights file, download an aggregate, and watch for new aggregates.

The leaf's credentials are a JSON file in the Python client's format
(leaf_name, leaf_password, tree_id, branch_id, and host/response_host and port
for the AMQP broker), named by --credentials or BRANCHKEY_CREDENTIALS; any
BRANCHKEY_LEAF_NAME, BRANCHKEY_LEAF_PASSWORD, BRANCHKEY_TREE_ID,
BRANCHKEY_BRANCH_ID, BRANCHKEY_HOST, BRANCHKEY_RESPONSE_HOST or BRANCHKEY_PORT
set overrides the file, and without a file they are the credentials. The
server is --server or BRANCHKEY_SERVER (default http://127.0.0.1:8080).
Notifications come from the broker the credentials name, or over the
server's Server-Sent Events when they name none (see --transport).

Each command logs in when it needs to and keeps the session (leaf id and
access token, never the password) in a file only you can read, under
--state-dir (default $XDG_STATE_HOME/branchkey or ~/.local/state/branchkey),
one per server and leaf. Later commands reuse it until the server refuses it,
then log in again; "logout" deletes it. For Server-Sent Events the same
directory keeps the id of the last event "watch" handled, so the next watch
resumes after it; the first watch of a leaf starts with the messages stored
since the leaf was created, as its broker queue does.

Uploads and downloads show a progress bar when stderr is a terminal
(--progress). Transient failures are retried; an upload carries an
idempotency key so a retry counts once, and a broken download resumes.
--json prints machine-readable output.`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.credentials, "credentials", os.Getenv("BRANCHKEY_CREDENTIALS"), "credentials JSON file (Python client format)")
	pf.StringVar(&f.server, "server", envOr("BRANCHKEY_SERVER", client.DefaultServer), "server base URL")
	pf.BoolVar(&f.json, "json", false, "print JSON")
	pf.StringVar(&f.stateDir, "state-dir", os.Getenv("BRANCHKEY_STATE_DIR"), "directory for saved sessions (default $XDG_STATE_HOME/branchkey)")
	pf.StringVar(&f.transport, "transport", "auto", "notifications over amqp, sse, or auto (amqp when the credentials name a broker host)")
	pf.StringVar(&f.progress, "progress", "auto", "progress bars: auto (when stderr is a terminal), always or never")
	cmd.AddCommand(leafLoginCmd(f), leafLogoutCmd(f), leafUploadCmd(f), leafDownloadCmd(f), leafWatchCmd(f))
	return cmd
}

// leafEnv is what a leaf command works with: the client, its saved
// session, and where output goes.
type leafEnv struct {
	f      *leafFlags
	c      *client.Client
	creds  client.Credentials
	store  *sessionStore
	saved  *client.Session
	cursor string // the last event id watch handled
	stdout io.Writer
	stderr io.Writer
}

// open loads the credentials, the saved session (unless fresh) and event
// cursor, and builds the client with the options opts returns.
func (f *leafFlags) open(cmd *cobra.Command, fresh bool, opts func(*leafEnv) []client.Option) (*leafEnv, error) {
	creds, err := client.LoadCredentials(f.credentials)
	if err != nil {
		return nil, err
	}
	if err := creds.Validate(); err != nil {
		if f.credentials == "" {
			return nil, fmt.Errorf("no credentials: give --credentials FILE or set BRANCHKEY_CREDENTIALS (%w)", err)
		}
		return nil, fmt.Errorf("%s: %w", f.credentials, err)
	}
	t := client.TransportAuto
	switch f.transport {
	case "auto", "":
	case "amqp", "sse":
		t = client.Transport(f.transport)
	default:
		return nil, fmt.Errorf("--transport %q: use amqp, sse or auto", f.transport)
	}
	store, err := newSessionStore(f.stateDir, f.server, creds)
	if err != nil {
		return nil, err
	}
	e := &leafEnv{f: f, creds: creds, store: store, stdout: cmd.OutOrStdout(), stderr: cmd.ErrOrStderr()}
	e.saved, err = store.load()
	if err != nil {
		fmt.Fprintf(e.stderr, "branchkey: ignoring the saved session: %v\n", err)
	}
	e.cursor = store.loadCursor()
	base := []client.Option{
		client.WithServer(f.server),
		client.WithTransport(t),
		client.WithLogger(slog.New(slog.NewTextHandler(e.stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))),
	}
	if e.saved != nil && !fresh {
		base = append(base, client.WithSession(*e.saved))
	}
	switch f.progress {
	case "never":
	case "always":
		base = append(base, client.WithProgress(newBars(e.stderr).report))
	case "auto", "":
		if file, ok := e.stderr.(*os.File); ok && !f.json && term.IsTerminal(int(file.Fd())) {
			base = append(base, client.WithProgress(newBars(e.stderr).report))
		}
	default:
		return nil, fmt.Errorf("--progress %q: use auto, always or never", f.progress)
	}
	if opts != nil {
		base = append(base, opts(e)...)
	}
	e.c, err = client.New(creds, base...)
	if err != nil {
		return nil, err
	}
	return e, nil
}

// close stops the client and keeps its session for the next command.
func (e *leafEnv) close() error {
	_ = e.c.Close()
	return e.save()
}

// save writes the client's session if it is not the saved one.
func (e *leafEnv) save() error {
	s := e.c.Session()
	if s == nil || (e.saved != nil && *s == *e.saved) {
		return nil
	}
	if err := e.store.save(s); err != nil {
		return fmt.Errorf("save the session: %w", err)
	}
	e.saved = s
	return nil
}

// print writes v as JSON with --json, else text.
func (e *leafEnv) print(v any, text string) error {
	if e.f.json {
		enc := json.NewEncoder(e.stdout)
		enc.SetEscapeHTML(false)
		return enc.Encode(v)
	}
	_, err := fmt.Fprintln(e.stdout, text)
	return err
}

// leafRun wraps a leaf command: it opens the environment, runs act, and
// saves the session whatever act returned.
func leafRun(f *leafFlags, fresh bool, opts func(*leafEnv) []client.Option, act func(ctx context.Context, e *leafEnv, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		e, err := f.open(cmd, fresh, opts)
		if err != nil {
			return err
		}
		err = act(cmd.Context(), e, args)
		if cerr := e.close(); err == nil {
			err = cerr
		}
		return err
	}
}

func leafLoginCmd(f *leafFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "login",
		Short: "Log the leaf in and save the session",
		Long: `login logs the leaf in, whether or not a session is saved, and saves the new
one. Other commands log in by themselves when they need to; login checks the
credentials and prepares the leaf's queue on the broker ahead of time.`,
		Args: cobra.NoArgs,
		RunE: leafRun(f, true, withoutConsumer, func(ctx context.Context, e *leafEnv, _ []string) error {
			c := e.c
			if err := c.Login(ctx); err != nil {
				return err
			}
			if err := e.save(); err != nil {
				return err
			}
			s := c.Session()
			out := map[string]any{"status": "logged_in", "leaf_name": e.creds.LeafName, "leaf_id": s.LeafID,
				"tree_id": e.creds.TreeID, "branch_id": e.creds.BranchID, "run_status": c.RunStatus()}
			return e.print(out, fmt.Sprintf("leaf %s logged in (id %s); the run of branch %s is %s", e.creds.LeafName, s.LeafID, e.creds.BranchID, c.RunStatus()))
		}),
	}
}

func leafLogoutCmd(f *leafFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "logout",
		Short: "Log the leaf out and delete the saved session",
		Long: `logout logs the leaf out: every access token of the leaf stops working, on HTTP
and on the broker, including those of other processes using the same leaf.
The saved session is deleted.`,
		Args: cobra.NoArgs,
		RunE: leafRun(f, false, withoutConsumer, func(ctx context.Context, e *leafEnv, _ []string) error {
			if err := e.c.Logout(ctx); err != nil {
				return err
			}
			if err := e.store.remove(); err != nil {
				return err
			}
			e.saved = nil
			return e.print(map[string]string{"status": "logged_out", "leaf_name": e.creds.LeafName}, "leaf "+e.creds.LeafName+" logged out")
		}),
	}
}

func leafUploadCmd(f *leafFlags) *cobra.Command {
	var metadata string
	cmd := &cobra.Command{
		Use:   "upload FILE",
		Short: "Upload a weights file to the current round; print its file id",
		Long: `upload checks that FILE is a valid weights file (an .npy of (num_samples,
[arrays]) as the Python client writes) and uploads it to the current round of
the leaf's branch. It prints the update's file id on stdout. The file streams
from disk; a failed attempt is retried under the same idempotency key, so the
update counts once.`,
		Args: cobra.ExactArgs(1),
		RunE: leafRun(f, false, withoutConsumer, func(ctx context.Context, e *leafEnv, args []string) error {
			id, err := e.c.FileUpload(ctx, args[0], client.WithMetadata(metadata))
			if err != nil {
				return err
			}
			return e.print(map[string]string{"file_id": id, "file": args[0]}, id)
		}),
	}
	cmd.Flags().StringVar(&metadata, "metadata", "", "free text sent with the file")
	return cmd
}

func leafDownloadCmd(f *leafFlags) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "download ID",
		Short: "Download a file (an aggregate or an own upload); print its path",
		Long: `download fetches the file with that id, an aggregate of the leaf's branch or
one of its own uploads, into --dir (default ./aggregated_files) as DIR/ID, and
prints the path. The file appears whole or not at all; a broken transfer
resumes where it stopped.`,
		Args: cobra.ExactArgs(1),
		RunE: leafRun(f, false, func(*leafEnv) []client.Option {
			return []client.Option{client.WithoutConsumer(), client.WithDownloadDir(dir)}
		}, func(ctx context.Context, e *leafEnv, args []string) error {
			path, err := e.c.FileDownload(ctx, args[0])
			if err != nil {
				return err
			}
			return e.print(downloadOutput(args[0], path), path)
		}),
	}
	cmd.Flags().StringVar(&dir, "dir", client.DefaultDownloadDir, "directory to download into")
	return cmd
}

// withoutConsumer is the options of the commands that receive no
// notifications, so that they take nothing off the leaf's queue.
func withoutConsumer(*leafEnv) []client.Option { return []client.Option{client.WithoutConsumer()} }

func downloadOutput(id, path string) map[string]any {
	out := map[string]any{"file_id": id, "path": path}
	if fi, err := os.Stat(path); err == nil {
		out["bytes"] = fi.Size()
	}
	return out
}

// watchEvent is one line of watch's JSON output.
type watchEvent struct {
	Type          string              `json:"type"`
	ID            string              `json:"id,omitempty"`
	AggregationID string              `json:"aggregation_id,omitempty"`
	Path          string              `json:"path,omitempty"`
	Run           int                 `json:"run,omitempty"`
	Round         int                 `json:"round,omitempty"`
	NumSamples    int64               `json:"num_samples,omitempty"`
	RunStatus     branchkey.RunStatus `json:"run_status,omitempty"`
}

func leafWatchCmd(f *leafFlags) *cobra.Command {
	var dir, execCmd string
	var count int
	cmd := &cobra.Command{
		Use:   "watch [--count N] [--dir D] [--exec CMD]",
		Short: "Wait for aggregates, download each, optionally run a command on it",
		Long: `watch logs in, listens for the branch's notifications and downloads each new
aggregate into --dir (default ./aggregated_files) as it arrives, printing its
path (with --json, one JSON object per line, run status changes included).

--exec CMD runs CMD with the aggregate's path as its last argument, through
/bin/sh, once the file is complete, and waits for it: this is where a
training script picks up the new global model. CMD also finds the path in
BRANCHKEY_AGGREGATE, and BRANCHKEY_AGGREGATION_ID, BRANCHKEY_RUN,
BRANCHKEY_ROUND and BRANCHKEY_NUM_SAMPLES in its environment. Its output goes
to stderr, so that stdout stays one line per aggregate. A command that fails
stops watch with an error.

watch exits after --count aggregates, or runs until interrupted. It
reconnects by itself when the server or the broker goes away, and logs in
again when its session is refused.

Example, from a training loop in any language:

  branchkey leaf upload --credentials leaf.json weights.npy
  branchkey leaf watch --credentials leaf.json --count 1 --exec "python train.py --init"`,
		Args: cobra.NoArgs,
		PreRunE: func(*cobra.Command, []string) error {
			if count < 0 {
				return fmt.Errorf("--count %d: give a positive number, or 0 for no limit", count)
			}
			return nil
		},
		RunE: leafRun(f, false, func(e *leafEnv) []client.Option {
			return []client.Option{client.WithDownloadDir(dir), client.WithLastEventID(e.cursor)}
		}, func(ctx context.Context, e *leafEnv, _ []string) error {
			return watch(ctx, e, count, execCmd)
		}),
	}
	cmd.Flags().IntVar(&count, "count", 0, "exit after this many aggregates (0: run until interrupted)")
	cmd.Flags().StringVar(&dir, "dir", client.DefaultDownloadDir, "directory to download aggregates into")
	cmd.Flags().StringVar(&execCmd, "exec", "", "command to run with each aggregate's path")
	return cmd
}

// watch handles notifications until count aggregates were handled or ctx
// ends.
func watch(ctx context.Context, e *leafEnv, count int, execCmd string) error {
	if err := e.c.Login(ctx); err != nil {
		return err
	}
	if err := e.save(); err != nil {
		return err
	}
	handled := 0
	for count == 0 || handled < count {
		var n client.Notification
		var ok bool
		select {
		case <-ctx.Done():
			return nil // interrupted: a clean stop
		case n, ok = <-e.c.Updates():
		}
		if !ok {
			if err := e.c.Err(); err != nil {
				return err
			}
			return errors.New("notifications stopped")
		}
		switch n.Type {
		case branchkey.MessageAggregationStatus:
			if n.AggregationID == "" {
				fmt.Fprintf(e.stderr, "branchkey: notification %s names no aggregate; ignored\n", n.ID)
				break
			}
			path, err := e.c.FileDownload(ctx, n.AggregationID)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			abs, err := filepath.Abs(path)
			if err != nil {
				return err
			}
			ev := watchEvent{Type: n.Type, ID: n.ID, AggregationID: n.AggregationID, Path: abs, Run: n.Run, Round: n.Round, NumSamples: n.NumSamples}
			if err := e.print(ev, abs); err != nil {
				return err
			}
			if execCmd != "" {
				if err := runExec(ctx, e.stderr, execCmd, abs, n); err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("--exec for aggregate %s: %w", n.AggregationID, err)
				}
			}
			handled++
		case branchkey.MessageRunStatus:
			ev := watchEvent{Type: n.Type, ID: n.ID, Run: n.Run, Round: n.Round, RunStatus: n.RunStatus}
			if e.f.json {
				if err := e.print(ev, ""); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(e.stderr, "branchkey: the run of branch %s is now %s (run %d, round %d)\n", e.creds.BranchID, n.RunStatus, n.Run, n.Round)
			}
		}
		// Handled: the next watch starts after it. (A broker keeps its
		// own place in the leaf's queue.)
		if e.c.Transport() == client.TransportSSE {
			if err := e.store.saveCursor(n.ID); err != nil {
				return err
			}
		}
		// A long watch may have logged in again; let other commands
		// use the new session.
		if err := e.save(); err != nil {
			return err
		}
	}
	return nil
}

// runExec runs the --exec command with the aggregate's path.
func runExec(ctx context.Context, stderr io.Writer, command, path string, n client.Notification) error {
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command+` "$@"`, "branchkey-watch", path)
	cmd.Stdout, cmd.Stderr = stderr, stderr
	cmd.Env = append(os.Environ(),
		"BRANCHKEY_AGGREGATE="+path,
		"BRANCHKEY_AGGREGATION_ID="+n.AggregationID,
		"BRANCHKEY_RUN="+strconv.Itoa(n.Run),
		"BRANCHKEY_ROUND="+strconv.Itoa(n.Round),
		"BRANCHKEY_NUM_SAMPLES="+strconv.FormatInt(n.NumSamples, 10),
	)
	cmd.WaitDelay = 5 * time.Second
	return cmd.Run()
}

// sessionStore keeps a leaf's session and event cursor in files under the
// state directory, one pair per server and leaf: sessions/KEY.json (the
// leaf id and access token, deleted by logout) and cursors/KEY (the last
// event id watch handled). Both are written atomically and readable by
// their owner only.
type sessionStore struct {
	dir    string
	key    string
	server string
	creds  client.Credentials
}

// savedSession is a session file's content.
type savedSession struct {
	Server   string `json:"server"`
	LeafName string `json:"leaf_name"`
	TreeID   string `json:"tree_id"`
	BranchID string `json:"branch_id"`
	client.Session
}

// defaultStateDir is $XDG_STATE_HOME/branchkey, or ~/.local/state/branchkey.
func defaultStateDir() (string, error) {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "branchkey"), nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("no state directory: set --state-dir or BRANCHKEY_STATE_DIR (%w)", err)
	}
	return filepath.Join(home, ".local", "state", "branchkey"), nil
}

func newSessionStore(dir, server string, creds client.Credentials) (*sessionStore, error) {
	if dir == "" {
		var err error
		if dir, err = defaultStateDir(); err != nil {
			return nil, err
		}
	}
	server = strings.TrimRight(server, "/")
	sum := sha256.Sum256([]byte(strings.Join([]string{server, creds.LeafName, creds.TreeID, creds.BranchID}, "\x00")))
	return &sessionStore{dir: dir, key: hex.EncodeToString(sum[:12]), server: server, creds: creds}, nil
}

func (s *sessionStore) sessionPath() string { return filepath.Join(s.dir, "sessions", s.key+".json") }
func (s *sessionStore) cursorPath() string  { return filepath.Join(s.dir, "cursors", s.key) }

// load returns the saved session, nil if there is none.
func (s *sessionStore) load() (*client.Session, error) {
	b, err := os.ReadFile(s.sessionPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	var v savedSession
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("%s: %w", s.sessionPath(), err)
	}
	if v.Server != s.server || v.LeafName != s.creds.LeafName || v.TreeID != s.creds.TreeID || v.BranchID != s.creds.BranchID ||
		v.LeafID == "" || v.AccessToken == "" {
		return nil, nil
	}
	return &v.Session, nil
}

// save writes the session.
func (s *sessionStore) save(sess *client.Session) error {
	b, err := json.MarshalIndent(savedSession{Server: s.server, LeafName: s.creds.LeafName, TreeID: s.creds.TreeID, BranchID: s.creds.BranchID, Session: *sess}, "", "  ")
	if err != nil {
		return err
	}
	return writePrivate(s.sessionPath(), append(b, '\n'))
}

// remove deletes the saved session.
func (s *sessionStore) remove() error {
	if err := os.Remove(s.sessionPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// loadCursor returns the last event id watch handled, "" if none.
func (s *sessionStore) loadCursor() string {
	b, err := os.ReadFile(s.cursorPath())
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// saveCursor records the last event id watch handled.
func (s *sessionStore) saveCursor(id string) error {
	if id == "" {
		return nil
	}
	return writePrivate(s.cursorPath(), []byte(id+"\n"))
}

// writePrivate writes a file only its owner can read, atomically.
func writePrivate(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// bars draws a progress bar per transfer on a terminal.
type bars struct {
	w       io.Writer
	bar     *progressbar.ProgressBar
	attempt int
	name    string
}

func newBars(w io.Writer) *bars { return &bars{w: w} }

func (b *bars) report(p client.Progress) {
	if b.bar == nil && (p.Finished || (p.Total < 0 && p.Done == 0)) {
		return // nothing drawn yet: a download before its answer, or a failure
	}
	if b.bar == nil || p.Attempt != b.attempt || p.Name != b.name || (p.Total >= 0 && b.bar.GetMax64() != p.Total) {
		if b.bar != nil {
			_ = b.bar.Exit()
		}
		desc := p.Op + " " + p.Name
		if p.Attempt > 1 {
			desc += fmt.Sprintf(" (attempt %d)", p.Attempt)
		}
		b.bar = progressbar.NewOptions64(p.Total,
			progressbar.OptionSetWriter(b.w),
			progressbar.OptionSetDescription(desc),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowTotalBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionSpinnerType(14),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(b.w) }),
		)
		b.attempt, b.name = p.Attempt, p.Name
		_ = b.bar.Set64(p.Done)
	}
	if !p.Finished {
		_ = b.bar.Set64(p.Done)
		return
	}
	if p.Err == nil {
		_ = b.bar.Finish()
	} else {
		_ = b.bar.Exit()
	}
	b.bar = nil
}
