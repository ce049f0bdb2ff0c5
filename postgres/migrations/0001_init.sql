-- The first schema: trees, branches, leaves, tokens, rounds, updates,
-- aggregations and the message outbox.
--
-- Identifiers and names are TEXT COLLATE "C", so ORDER BY compares bytes the
-- way Go compares strings, whatever the database's default collation. Times
-- are TIMESTAMPTZ (microseconds); NULL means unset. Durations are BIGINT
-- nanoseconds. Id lists are TEXT[]; strategy options and message bodies are
-- JSON kept as TEXT, byte for byte as the caller gave them.

CREATE TABLE trees (
	id         TEXT COLLATE "C" PRIMARY KEY,
	created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE branches (
	tree_id          TEXT COLLATE "C" NOT NULL REFERENCES trees (id) ON DELETE CASCADE,
	id               TEXT COLLATE "C" NOT NULL,
	min_updates      BIGINT      NOT NULL,
	sample_size      BIGINT      NOT NULL,
	max_wait         BIGINT      NOT NULL,
	min_quorum       BIGINT      NOT NULL,
	strategy         TEXT        NOT NULL,
	strategy_options TEXT        NOT NULL DEFAULT '{}',
	allow_non_finite BOOLEAN     NOT NULL,
	run_status       TEXT        NOT NULL CHECK (run_status IN ('start', 'pause', 'stop')),
	run_number       BIGINT      NOT NULL,
	round            BIGINT      NOT NULL,
	created_at       TIMESTAMPTZ NOT NULL,
	PRIMARY KEY (tree_id, id)
);

CREATE TABLE leaves (
	id            TEXT COLLATE "C" PRIMARY KEY,
	tree_id       TEXT COLLATE "C" NOT NULL,
	branch_id     TEXT COLLATE "C" NOT NULL,
	name          TEXT COLLATE "C" NOT NULL CONSTRAINT leaves_name_key UNIQUE,
	password_hash TEXT        NOT NULL,
	created_at    TIMESTAMPTZ NOT NULL,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX leaves_branch ON leaves (tree_id, branch_id, name);

CREATE TABLE tokens (
	hash       TEXT COLLATE "C" PRIMARY KEY,
	leaf_id    TEXT COLLATE "C" NOT NULL REFERENCES leaves (id) ON DELETE CASCADE,
	created_at TIMESTAMPTZ NOT NULL,
	expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX tokens_leaf ON tokens (leaf_id, expires_at);
CREATE INDEX tokens_expires ON tokens (expires_at);

CREATE TABLE rounds (
	tree_id         TEXT COLLATE "C" NOT NULL,
	branch_id       TEXT COLLATE "C" NOT NULL,
	run             BIGINT NOT NULL,
	round           BIGINT NOT NULL,
	status          TEXT   NOT NULL CHECK (status IN ('open', 'closed', 'done', 'failed')),
	signature       TEXT   NOT NULL DEFAULT '',
	first_update_at TIMESTAMPTZ,
	closed_at       TIMESTAMPTZ,
	trigger         TEXT   NOT NULL DEFAULT '',
	inputs          TEXT[] NOT NULL DEFAULT '{}',
	claim_owner     TEXT   NOT NULL DEFAULT '',
	claim_until     TIMESTAMPTZ,
	aggregation_id  TEXT   NOT NULL DEFAULT '',
	error           TEXT   NOT NULL DEFAULT '',
	PRIMARY KEY (tree_id, branch_id, run, round),
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX rounds_status ON rounds (status);

-- An update outlives its leaf when it belongs to a closed round (it is an
-- input of an aggregation), so leaf_id has no foreign key.
CREATE TABLE updates (
	id              TEXT COLLATE "C" PRIMARY KEY,
	tree_id         TEXT COLLATE "C" NOT NULL,
	branch_id       TEXT COLLATE "C" NOT NULL,
	leaf_id         TEXT COLLATE "C" NOT NULL,
	run             BIGINT      NOT NULL,
	round           BIGINT      NOT NULL,
	num_samples     BIGINT      NOT NULL,
	size            BIGINT      NOT NULL,
	blob_key        TEXT        NOT NULL,
	signature       TEXT        NOT NULL,
	filename        TEXT        NOT NULL,
	metadata        TEXT        NOT NULL,
	idempotency_key TEXT        NOT NULL DEFAULT '',
	superseded      BOOLEAN     NOT NULL DEFAULT FALSE,
	created_at      TIMESTAMPTZ NOT NULL,
	FOREIGN KEY (tree_id, branch_id, run, round)
		REFERENCES rounds (tree_id, branch_id, run, round) ON DELETE CASCADE
);
CREATE INDEX updates_round ON updates (tree_id, branch_id, run, round, superseded, leaf_id);
CREATE INDEX updates_leaf ON updates (leaf_id);
CREATE UNIQUE INDEX updates_idempotency ON updates (leaf_id, idempotency_key)
	WHERE idempotency_key <> '';
-- The store keeps one current update per leaf and round under the branch's
-- row lock; the index makes the database refuse a second one regardless.
CREATE UNIQUE INDEX updates_current ON updates (tree_id, branch_id, run, round, leaf_id)
	WHERE NOT superseded;

CREATE TABLE aggregations (
	id          TEXT COLLATE "C" PRIMARY KEY,
	tree_id     TEXT COLLATE "C" NOT NULL,
	branch_id   TEXT COLLATE "C" NOT NULL,
	run         BIGINT NOT NULL,
	round       BIGINT NOT NULL,
	inputs      TEXT[] NOT NULL DEFAULT '{}',
	num_samples BIGINT NOT NULL,
	strategy    TEXT   NOT NULL,
	mode        TEXT   NOT NULL,
	size        BIGINT NOT NULL,
	blob_key    TEXT   NOT NULL,
	state_key   TEXT   NOT NULL,
	started_at  TIMESTAMPTZ,
	finished_at TIMESTAMPTZ,
	duration    BIGINT NOT NULL,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX aggregations_branch ON aggregations (tree_id, branch_id, run, round);

-- The outbox. seq is an identity, never reused: it is the SSE event id
-- watchers resume from. Inserts hold a transaction-level advisory lock until
-- they commit (see message.go), so seqs become visible in increasing order.
CREATE TABLE messages (
	seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	id           TEXT COLLATE "C" NOT NULL CONSTRAINT messages_id_key UNIQUE,
	tree_id      TEXT COLLATE "C" NOT NULL,
	branch_id    TEXT COLLATE "C" NOT NULL,
	type         TEXT        NOT NULL,
	body         TEXT        NOT NULL,
	created_at   TIMESTAMPTZ NOT NULL,
	published_at TIMESTAMPTZ,
	lease_owner  TEXT        NOT NULL DEFAULT '',
	lease_until  TIMESTAMPTZ,
	FOREIGN KEY (tree_id, branch_id) REFERENCES branches (tree_id, id) ON DELETE CASCADE
);
CREATE INDEX messages_branch ON messages (tree_id, branch_id, seq);
CREATE INDEX messages_unpublished ON messages (seq) WHERE published_at IS NULL;
