-- The embedded store for `fresco run`: same model as PostgreSQL; times are Unix milliseconds.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    client_request_id TEXT UNIQUE,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    output_url TEXT NOT NULL,
    batch_size INTEGER NOT NULL CHECK (batch_size > 0),
    priority INTEGER NOT NULL DEFAULT 0,
    seed INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    total_prompts INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
);
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);

CREATE TABLE prompts (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed INTEGER NOT NULL,
    extra TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;

CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    first_idx INTEGER NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    params TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'leased', 'succeeded', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    lease_token TEXT,
    leased_by TEXT,
    lease_expires_at INTEGER,
    available_at INTEGER NOT NULL,
    last_error TEXT,
    updated_at INTEGER NOT NULL
);
CREATE INDEX tasks_job_state ON tasks (job_id, state);
CREATE INDEX tasks_leased ON tasks (state, lease_expires_at);

CREATE TABLE outputs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    object_key TEXT NOT NULL,
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    worker TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;

CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    models TEXT NOT NULL,
    device TEXT NOT NULL,
    max_batch INTEGER NOT NULL,
    loaded_model TEXT,
    registered_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
