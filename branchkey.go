// Package branchkey holds the domain of the branchkey aggregation system:
// trees, branches, leaves, updates, rounds, aggregations and messages, the
// domain error type, and the interfaces the adapters implement (Store,
// BlobStore, Notifier, Broker). It imports nothing outside the standard
// library; every dependency lives in the package named after it.
package branchkey

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"
)

// Version is the server and client version, set at build time with
// -ldflags "-X github.com/branchkey/branchkey.Version=...".
var Version = "0.1.0-dev"

// Tree is a federation: a set of branches whose leaves train one model family.
// On RabbitMQ a tree is a virtual host.
type Tree struct {
	ID        string    `json:"id"`
	CreatedAt time.Time `json:"created_at"`
}

// RunStatus is the state of a branch's training run, as sent to leaves in
// run_status messages.
type RunStatus string

// The run states. Uploads are accepted only while a run is started.
const (
	RunStarted RunStatus = "start"
	RunPaused  RunStatus = "pause"
	RunStopped RunStatus = "stop"
)

// Valid reports whether s is one of the three run states.
func (s RunStatus) Valid() bool {
	return s == RunStarted || s == RunPaused || s == RunStopped
}

// Policy decides when a branch's round aggregates and how.
type Policy struct {
	// MinUpdates aggregates the round as soon as that many distinct leaves
	// have uploaded to it. At least 1.
	MinUpdates int `json:"min_updates"`
	// SampleSize is how many of the round's updates are aggregated, chosen
	// uniformly at random without replacement; 0 means all of them.
	SampleSize int `json:"sample_size"`
	// MaxWait, when positive, aggregates what has arrived once that long has
	// passed since the round's first update, if at least MinQuorum leaves
	// uploaded.
	MaxWait time.Duration `json:"max_wait"`
	// MinQuorum is the smallest number of leaves a MaxWait round aggregates.
	MinQuorum int `json:"min_quorum"`
	// Strategy names an aggregation strategy ("fedavg", "median", ...).
	Strategy string `json:"strategy"`
	// StrategyOptions holds the strategy's own parameters ("trim": "0.1",
	// "byzantine": "1", ...), as the aggregate command's flags name them.
	StrategyOptions map[string]string `json:"strategy_options,omitempty"`
	// AllowNonFinite accepts updates holding NaN or Inf.
	AllowNonFinite bool `json:"allow_non_finite"`
}

// Branch is an aggregation group inside a tree. Its leaves' updates are
// averaged together, round after round. On RabbitMQ a branch is an exchange.
type Branch struct {
	TreeID    string    `json:"tree_id"`
	ID        string    `json:"id"`
	Policy    Policy    `json:"policy"`
	RunStatus RunStatus `json:"run_status"`
	// RunNumber counts the branch's runs; a start after a stop opens the next.
	RunNumber int `json:"run_number"`
	// Round is the number of the round that currently accepts uploads, from 1
	// in each run.
	Round     int       `json:"round"`
	CreatedAt time.Time `json:"created_at"`
}

// Leaf is one training site. Its Name and password log it in; its ID is the
// identity of every later call, its AMQP user and its queue.
type Leaf struct {
	ID           string    `json:"id"`
	TreeID       string    `json:"tree_id"`
	BranchID     string    `json:"branch_id"`
	Name         string    `json:"name"`
	PasswordHash string    `json:"-"`
	CreatedAt    time.Time `json:"created_at"`
}

// Token is an access token issued at login. Only its hash is stored.
type Token struct {
	Hash      string    `json:"-"`
	LeafID    string    `json:"leaf_id"`
	CreatedAt time.Time `json:"created_at"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Update is one leaf's weights file in one round.
type Update struct {
	ID         string `json:"id"`
	TreeID     string `json:"tree_id"`
	BranchID   string `json:"branch_id"`
	LeafID     string `json:"leaf_id"`
	Run        int    `json:"run"`
	Round      int    `json:"round"`
	NumSamples int64  `json:"num_samples"`
	Size       int64  `json:"size"`
	// BlobKey is where the file's bytes are in the BlobStore.
	BlobKey string `json:"-"`
	// Signature describes the file's tensors (dtypes and shapes); every
	// update of a round has the round's signature.
	Signature string `json:"signature"`
	Filename  string `json:"filename"`
	Metadata  string `json:"metadata"`
	// IdempotencyKey, when set, makes a retried upload return the first
	// one's update instead of recording a second.
	IdempotencyKey string `json:"-"`
	// Superseded is set when the leaf uploaded again in the same round.
	Superseded bool      `json:"superseded"`
	CreatedAt  time.Time `json:"created_at"`
}

// RoundKey names one round of one run of one branch.
type RoundKey struct {
	TreeID   string `json:"tree_id"`
	BranchID string `json:"branch_id"`
	Run      int    `json:"run"`
	Round    int    `json:"round"`
}

// String names the round for messages: round 3 of run 1 of branch "b" of
// tree "t".
func (k RoundKey) String() string {
	return fmt.Sprintf("round %d of run %d of branch %q of tree %q", k.Round, k.Run, k.BranchID, k.TreeID)
}

// CurrentRound is the key of the round that accepts the branch's uploads.
func (b *Branch) CurrentRound() RoundKey {
	return RoundKey{TreeID: b.TreeID, BranchID: b.ID, Run: b.RunNumber, Round: b.Round}
}

// RoundKey is the key of the round the update belongs to.
func (u *Update) RoundKey() RoundKey {
	return RoundKey{TreeID: u.TreeID, BranchID: u.BranchID, Run: u.Run, Round: u.Round}
}

// CheckInputs checks that inputs, the updates chosen to aggregate a round,
// are distinct current updates of the round (ups). EINVALID otherwise.
func CheckInputs(key RoundKey, ups []*Update, inputs []string) error {
	in := make(map[string]bool, len(ups))
	for _, u := range ups {
		in[u.ID] = true
	}
	seen := make(map[string]bool, len(inputs))
	for _, id := range inputs {
		if !in[id] {
			return Errorf(EINVALID, "update %q is not a current update of %s", id, key)
		}
		if seen[id] {
			return Errorf(EINVALID, "update %q is picked twice for %s", id, key)
		}
		seen[id] = true
	}
	return nil
}

// RoundStatus is where a round is in its life.
type RoundStatus string

// The round states: open (accepting uploads), closed (its inputs are fixed
// and it waits to be aggregated), done (aggregated) and failed (aggregation
// refused the inputs; the reason is kept).
const (
	RoundOpen   RoundStatus = "open"
	RoundClosed RoundStatus = "closed"
	RoundDone   RoundStatus = "done"
	RoundFailed RoundStatus = "failed"
)

// Round collects at most one update per leaf until its policy triggers.
type Round struct {
	RoundKey
	Status RoundStatus `json:"status"`
	// Signature is the first update's signature; later uploads must match.
	Signature string `json:"signature"`
	// Count is the number of distinct leaves with an update in the round.
	Count         int       `json:"count"`
	FirstUpdateAt time.Time `json:"first_update_at"`
	ClosedAt      time.Time `json:"closed_at"`
	// Trigger says why the round closed ("min_updates", "max_wait").
	Trigger string `json:"trigger"`
	// Inputs are the update ids chosen to aggregate, fixed when it closes.
	Inputs        []string  `json:"inputs"`
	ClaimOwner    string    `json:"claim_owner"`
	ClaimUntil    time.Time `json:"claim_until"`
	AggregationID string    `json:"aggregation_id"`
	Error         string    `json:"error"`
}

// Aggregation is the record of one aggregated round; its ID is the
// aggregation_id leaves download.
type Aggregation struct {
	ID       string `json:"id"`
	TreeID   string `json:"tree_id"`
	BranchID string `json:"branch_id"`
	Run      int    `json:"run"`
	Round    int    `json:"round"`
	// Inputs are the ids of the updates that were aggregated.
	Inputs     []string `json:"inputs"`
	NumSamples int64    `json:"num_samples"`
	Strategy   string   `json:"strategy"`
	// Mode is "incremental" or "blocked", the engine path that produced it.
	Mode    string `json:"mode"`
	Size    int64  `json:"size"`
	BlobKey string `json:"-"`
	// StateKey is the blob holding a server optimizer's state after this
	// round, if the strategy keeps one.
	StateKey   string        `json:"-"`
	StartedAt  time.Time     `json:"started_at"`
	FinishedAt time.Time     `json:"finished_at"`
	Duration   time.Duration `json:"duration"`
}

// Message types sent to leaves.
const (
	MessageAggregationStatus = "aggregation_status"
	MessageRunStatus         = "run_status"
)

// Message is a notification for every leaf of a branch. Messages are stored
// (an outbox) before anything delivers them.
type Message struct {
	// Seq is assigned by the store, increasing; it is the SSE event id.
	Seq int64 `json:"seq"`
	// ID is unique per message (the AMQP message_id), so consumers can drop
	// duplicates of an at-least-once delivery.
	ID        string          `json:"id"`
	TreeID    string          `json:"tree_id"`
	BranchID  string          `json:"branch_id"`
	Type      string          `json:"message_type"`
	Body      json.RawMessage `json:"body"`
	CreatedAt time.Time       `json:"created_at"`
}

// Payload returns the JSON leaves receive:
// {"message_type": ..., "body": {...}}.
func (m *Message) Payload() []byte {
	b, _ := json.Marshal(struct {
		Type string          `json:"message_type"`
		Body json.RawMessage `json:"body"`
	}{m.Type, m.Body})
	return b
}

// PutResult is what Store.PutUpdate did.
type PutResult struct {
	// Round is the round the update went into, after it.
	Round *Round
	// Replaced is the leaf's earlier update of that round, now superseded.
	Replaced *Update
	// Existing is set, and nothing was written, when an update with the same
	// leaf and idempotency key was already recorded.
	Existing *Update
}

// Store keeps the metadata: trees, branches, leaves, tokens, updates, rounds,
// aggregations and the message outbox. Every method is safe for concurrent
// use by several goroutines and, for shared databases, several processes.
//
// Errors: ENOTFOUND for a missing thing, ECONFLICT for an id that exists or a
// state that forbids the change, EINVALID for a value the store cannot hold
// (an empty id, a bad run status), EUNAVAILABLE when the database cannot be
// reached; anything else is internal.
//
// Callbacks (PutUpdate's check, CloseRound's pick, SetRunStatus's msg) run
// inside the write transaction and must not call the Store. A limit of 0 or
// less means no limit.
type Store interface {
	// Ping checks the database answers.
	Ping(ctx context.Context) error
	// Close releases the database.
	Close() error

	// CreateTree records a tree. ECONFLICT if the id exists.
	CreateTree(ctx context.Context, t *Tree) error
	// FindTree returns a tree. ENOTFOUND.
	FindTree(ctx context.Context, id string) (*Tree, error)
	// ListTrees returns every tree, by id.
	ListTrees(ctx context.Context) ([]*Tree, error)
	// DeleteTree removes a tree with its branches, leaves, tokens, updates,
	// rounds, aggregations and messages, and returns its leaves' ids (for
	// the broker) and the blob keys that no longer have an owner. ENOTFOUND.
	DeleteTree(ctx context.Context, id string) (leaves []string, blobs []string, err error)

	// CreateBranch records a branch and, if its run is started, opens round
	// 1 of run 1. ENOTFOUND for the tree, ECONFLICT if the id exists.
	CreateBranch(ctx context.Context, b *Branch) error
	// FindBranch returns a branch. ENOTFOUND.
	FindBranch(ctx context.Context, treeID, id string) (*Branch, error)
	// ListBranches returns a tree's branches, by id; all of them when
	// treeID is "".
	ListBranches(ctx context.Context, treeID string) ([]*Branch, error)
	// DeleteBranch removes a branch like DeleteTree removes a tree, and
	// returns its leaves' ids (for the broker) and the orphaned blob keys.
	DeleteBranch(ctx context.Context, treeID, id string) (leaves []string, blobs []string, err error)
	// SetRunStatus changes a branch's run state and, in the same
	// transaction, stores the message msg builds from the changed branch. A
	// start after a stop (or the first start of a branch created paused, at
	// run 0) opens the next run at round 1; a stop marks the run's open
	// round failed, since it can no longer close. ENOTFOUND.
	SetRunStatus(ctx context.Context, treeID, id string, status RunStatus, msg func(*Branch) *Message) (*Branch, error)

	// CreateLeaf records a leaf. ENOTFOUND for the branch, ECONFLICT if the
	// id or the name is taken (names are unique across the server).
	CreateLeaf(ctx context.Context, l *Leaf) error
	// FindLeaf returns a leaf by id. ENOTFOUND.
	FindLeaf(ctx context.Context, id string) (*Leaf, error)
	// FindLeafByName returns a leaf by login name. ENOTFOUND.
	FindLeafByName(ctx context.Context, name string) (*Leaf, error)
	// ListLeaves returns a branch's leaves, by name.
	ListLeaves(ctx context.Context, treeID, branchID string) ([]*Leaf, error)
	// DeleteLeaf removes a leaf, its tokens and its updates of open rounds,
	// and returns their blob keys. ENOTFOUND.
	DeleteLeaf(ctx context.Context, id string) (blobs []string, err error)
	// SetLeafPassword replaces a leaf's password hash and revokes its
	// tokens. ENOTFOUND.
	SetLeafPassword(ctx context.Context, id, hash string) error

	// CreateToken records an access token (by hash).
	CreateToken(ctx context.Context, t *Token) error
	// FindToken returns the token with that hash. ENOTFOUND.
	FindToken(ctx context.Context, hash string) (*Token, error)
	// RevokeTokens deletes every token of a leaf.
	RevokeTokens(ctx context.Context, leafID string) error
	// DeleteExpiredTokens deletes tokens that expired before now and
	// returns the leaves left with no valid token, each once across all
	// callers, so their broker credentials can be revoked.
	DeleteExpiredTokens(ctx context.Context, now time.Time) (leaves []string, err error)

	// PutUpdate records u in its branch's open round, replacing the leaf's
	// earlier update of that round. It fills u.Run and u.Round. check runs
	// inside the transaction with the round as it is before u; an error from
	// it aborts and is returned. ECONFLICT when the run is not started; an
	// idempotent retry is answered with Existing whatever the run's state.
	PutUpdate(ctx context.Context, u *Update, check func(*Round) error) (*PutResult, error)
	// FindUpdate returns an update. ENOTFOUND.
	FindUpdate(ctx context.Context, id string) (*Update, error)
	// FindUpdateByKey returns the leaf's update with that idempotency key.
	// ENOTFOUND.
	FindUpdateByKey(ctx context.Context, leafID, key string) (*Update, error)
	// RoundUpdates returns the round's current (not superseded) updates, by
	// id.
	RoundUpdates(ctx context.Context, key RoundKey) ([]*Update, error)

	// FindRound returns a round. ENOTFOUND.
	FindRound(ctx context.Context, key RoundKey) (*Round, error)
	// OpenRounds returns every open round that has at least one update.
	OpenRounds(ctx context.Context) ([]*Round, error)
	// CloseRound closes the open round key, if it is still the branch's
	// current round, records the inputs pick chooses from its updates and
	// opens the next round. Exactly one caller succeeds; the others get
	// ECONFLICT.
	CloseRound(ctx context.Context, key RoundKey, trigger string, pick func([]*Update) ([]string, error)) (*Round, error)
	// ClaimRound gives owner the right to aggregate a closed round until
	// until, if nobody else holds an unexpired claim. ECONFLICT otherwise.
	ClaimRound(ctx context.Context, key RoundKey, owner string, now, until time.Time) (*Round, error)
	// PendingRounds returns closed rounds that nobody holds a claim on at
	// now: unclaimed, or whose claim expired.
	PendingRounds(ctx context.Context, now time.Time) ([]*Round, error)
	// FinishRound records the aggregation of a round claimed by owner and,
	// in the same transaction, marks the round done and stores msgs.
	// ECONFLICT if owner no longer holds the claim: another caller took it
	// over (an expired claim still held by its owner remains valid until
	// then).
	FinishRound(ctx context.Context, a *Aggregation, owner string, msgs []*Message) error
	// FailRound marks a round claimed by owner failed with the reason.
	// ECONFLICT if owner no longer holds the claim.
	FailRound(ctx context.Context, key RoundKey, owner, reason string) error

	// FindAggregation returns an aggregation. ENOTFOUND.
	FindAggregation(ctx context.Context, id string) (*Aggregation, error)
	// ListAggregations returns a branch's aggregations, oldest first.
	ListAggregations(ctx context.Context, treeID, branchID string) ([]*Aggregation, error)
	// LatestAggregation returns a branch's newest aggregation. ENOTFOUND.
	LatestAggregation(ctx context.Context, treeID, branchID string) (*Aggregation, error)

	// ListMessages returns up to limit of a branch's messages with Seq >
	// after, by Seq.
	ListMessages(ctx context.Context, treeID, branchID string, after int64, limit int) ([]*Message, error)
	// LastMessageSeq returns the highest Seq of any stored message (0 if
	// none), so a watcher can tell whether anything is new.
	LastMessageSeq(ctx context.Context) (int64, error)
	// ClaimOutbox leases up to limit unpublished messages to owner until
	// until, oldest first; messages leased by someone else are skipped until
	// their lease expires, and owner's own leases are renewed.
	ClaimOutbox(ctx context.Context, owner string, now, until time.Time, limit int) ([]*Message, error)
	// MarkPublished records that the broker confirmed the messages.
	MarkPublished(ctx context.Context, ids []string) error
}

// Blob is a stored file, readable in sequence or at any offset.
type Blob interface {
	io.Reader
	io.ReaderAt
	io.Seeker
	io.Closer
	// Size is the blob's length in bytes.
	Size() int64
}

// BlobWriter receives a new blob's bytes. Nothing is visible under the key
// until Commit returns nil, and then it is durable. The writer lives within
// the context given to Create: once it is cancelled, Write and Commit fail
// and nothing is published.
type BlobWriter interface {
	io.Writer
	// Commit makes the bytes durable and visible under the key.
	Commit() error
	// Abort discards the bytes. It is safe after Commit (then a no-op).
	Abort() error
}

// BlobStore holds update and aggregate files. Blobs stream: nothing here
// holds a whole file in memory.
//
// Keys are slash-separated paths of [A-Za-z0-9._-] segments, at most 1024
// bytes, with no empty or ".." segment; other keys are EINVALID.
//
// Errors: ENOTFOUND from Open for a missing key; EUNAVAILABLE when the
// storage cannot be reached.
type BlobStore interface {
	// Create starts a blob under key, replacing any blob with that key once
	// committed.
	Create(ctx context.Context, key string) (BlobWriter, error)
	// Open opens a blob for reading. ENOTFOUND.
	Open(ctx context.Context, key string) (Blob, error)
	// Delete removes a blob; a missing key is not an error.
	Delete(ctx context.Context, key string) error
}

// PutBlob stores r's bytes under key and returns how many there were.
func PutBlob(ctx context.Context, bs BlobStore, key string, r io.Reader) (int64, error) {
	w, err := bs.Create(ctx, key)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(w, r)
	if err != nil {
		_ = w.Abort()
		return n, err
	}
	return n, w.Commit()
}

// Notifier delivers a stored message to the leaves of its branch.
//
// Publish returns nil only once the message is delivered or durably queued
// (for RabbitMQ: confirmed by the broker). EUNAVAILABLE while the transport
// is down; the caller keeps the message and retries. ENOTFOUND when the
// transport has no route for the branch (no leaf of it was ever
// provisioned): nobody can receive it there, and the caller may drop it.
type Notifier interface {
	Publish(ctx context.Context, m *Message) error
}

// Broker sets up and tears down a message broker's side of leaves: on
// RabbitMQ a virtual host per tree, an exchange per branch, and per leaf a
// durable queue and a read-only user. Every method is idempotent.
//
// Errors: EUNAVAILABLE when the broker cannot be reached.
type Broker interface {
	// PrepareLeaf makes sure the tree's virtual host, the branch's exchange
	// and the leaf's queue, bound to the exchange, exist.
	PrepareLeaf(ctx context.Context, treeID, branchID, leafID string) error
	// GrantLeaf sets the leaf's broker user with password as its password,
	// allowed to read its own queue and nothing else. A leaf has one broker
	// password: a later grant replaces it for new connections.
	GrantLeaf(ctx context.Context, treeID, leafID, password string) error
	// RevokeLeaf removes the leaf's broker password and closes the user's
	// open connections; its queue stays, so messages keep waiting.
	RevokeLeaf(ctx context.Context, treeID, leafID string) error
	// DeleteLeaf removes the leaf's user and queue.
	DeleteLeaf(ctx context.Context, treeID, branchID, leafID string) error
	// DeleteBranch removes the branch's exchange and its leaves' users and
	// queues.
	DeleteBranch(ctx context.Context, treeID, branchID string, leafIDs []string) error
	// DeleteTree removes the tree's virtual host and everything in it, and
	// the users of its leaves.
	DeleteTree(ctx context.Context, treeID string, leafIDs []string) error
}
