-- The first schema: trees, branches, leaves, tokens, rounds, updates,
-- aggregations and the message outbox.
--
-- Times are TEXT in UTC with nine fractional digits
-- ("2006-01-02T15:04:05.000000000Z"), fixed width so that comparing the
-- strings compares the times; NULL means unset. Durations are INTEGER
-- nanoseconds. Lists and maps are JSON TEXT.

CREATE TABLE trees (
	id         TEXT PRIMARY KEY,
	created_at TEXT NOT NULL
);

CREATE TABLE branches (
	tree_id          TEXT    NOT NULL REFERENCES trees (id) ON DELETE CASCADE,
	id               TEXT    NOT NULL,
	min_updates      INTEGER NOT NULL,
	sample_size      INTEGER NOT NULL,
	max_wait         INTEGER NOT NULL,
	min_quorum       INTEGER NOT NULL,
	strategy         TEXT    NOT NULL,
	strategy_options TEXT    NOT NULL DEFAULT '{}',
	allow_non_finite INTEGER NOT NULL,
	run_status       TEXT    NOT NULL CHECK (run_status IN ('start', 'pause', 'stop')),
	run_number       INTEGER NOT NULL,
	round            INTEGER NOT NULL,
	created_at       TEXT    NOT NULL,
	PRIMARY KEY (tree_id, id)
);

CREATE TABLE leaves (
	id            TEXT PRIMARY KEY,
	tree_id       TEXT NOT NULL,
	branch_id     TEXT NOT NULL,
	name          TEXT NOT NULL UNIQUE,
	password_hash TEXT NOT NULL,
	created_at    TEXT NOT NULL,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX leaves_branch ON leaves (tree_id, branch_id, name);

CREATE TABLE tokens (
	hash       TEXT PRIMARY KEY,
	leaf_id    TEXT NOT NULL REFERENCES leaves (id) ON DELETE CASCADE,
	created_at TEXT NOT NULL,
	expires_at TEXT NOT NULL
);
CREATE INDEX tokens_leaf ON tokens (leaf_id, expires_at);
CREATE INDEX tokens_expires ON tokens (expires_at);

CREATE TABLE rounds (
	tree_id         TEXT    NOT NULL,
	branch_id       TEXT    NOT NULL,
	run             INTEGER NOT NULL,
	round           INTEGER NOT NULL,
	status          TEXT    NOT NULL CHECK (status IN ('open', 'closed', 'done', 'failed')),
	signature       TEXT    NOT NULL DEFAULT '',
	first_update_at TEXT,
	closed_at       TEXT,
	trigger         TEXT    NOT NULL DEFAULT '',
	inputs          TEXT    NOT NULL DEFAULT '[]',
	claim_owner     TEXT    NOT NULL DEFAULT '',
	claim_until     TEXT,
	aggregation_id  TEXT    NOT NULL DEFAULT '',
	error           TEXT    NOT NULL DEFAULT '',
	PRIMARY KEY (tree_id, branch_id, run, round),
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX rounds_status ON rounds (status);

-- An update outlives its leaf when it belongs to a closed round (it is an
-- input of an aggregation), so leaf_id has no foreign key.
CREATE TABLE updates (
	id              TEXT    PRIMARY KEY,
	tree_id         TEXT    NOT NULL,
	branch_id       TEXT    NOT NULL,
	leaf_id         TEXT    NOT NULL,
	run             INTEGER NOT NULL,
	round           INTEGER NOT NULL,
	num_samples     INTEGER NOT NULL,
	size            INTEGER NOT NULL,
	blob_key        TEXT    NOT NULL,
	signature       TEXT    NOT NULL,
	filename        TEXT    NOT NULL,
	metadata        TEXT    NOT NULL,
	idempotency_key TEXT    NOT NULL DEFAULT '',
	superseded      INTEGER NOT NULL DEFAULT 0,
	created_at      TEXT    NOT NULL,
	FOREIGN KEY (tree_id, branch_id, run, round)
		REFERENCES rounds (tree_id, branch_id, run, round) ON DELETE CASCADE
);
CREATE INDEX updates_round ON updates (tree_id, branch_id, run, round, superseded, leaf_id);
CREATE INDEX updates_leaf ON updates (leaf_id);
CREATE UNIQUE INDEX updates_idempotency ON updates (leaf_id, idempotency_key)
	WHERE idempotency_key <> '';

CREATE TABLE aggregations (
	id          TEXT    PRIMARY KEY,
	tree_id     TEXT    NOT NULL,
	branch_id   TEXT    NOT NULL,
	run         INTEGER NOT NULL,
	round       INTEGER NOT NULL,
	inputs      TEXT    NOT NULL DEFAULT '[]',
	num_samples INTEGER NOT NULL,
	strategy    TEXT    NOT NULL,
	mode        TEXT    NOT NULL,
	size        INTEGER NOT NULL,
	blob_key    TEXT    NOT NULL,
	state_key   TEXT    NOT NULL,
	started_at  TEXT,
	finished_at TEXT,
	duration    INTEGER NOT NULL,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX aggregations_branch ON aggregations (tree_id, branch_id, run, round);

-- The outbox. seq is AUTOINCREMENT so a deleted message's seq is never
-- reused: it is the SSE event id watchers resume from.
CREATE TABLE messages (
	seq          INTEGER PRIMARY KEY AUTOINCREMENT,
	id           TEXT NOT NULL UNIQUE,
	tree_id      TEXT NOT NULL,
	branch_id    TEXT NOT NULL,
	type         TEXT NOT NULL,
	body         TEXT NOT NULL,
	created_at   TEXT NOT NULL,
	published_at TEXT,
	lease_owner  TEXT NOT NULL DEFAULT '',
	lease_until  TEXT,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX messages_branch ON messages (tree_id, branch_id, seq);
CREATE INDEX messages_unpublished ON messages (seq) WHERE published_at IS NULL;
