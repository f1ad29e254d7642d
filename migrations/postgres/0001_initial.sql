-- fresco's queue. A job holds prompts; tasks are batches of consecutive prompts; outputs are per prompt.
CREATE TABLE jobs (
    id UUID PRIMARY KEY,
    client_request_id TEXT UNIQUE,
    model TEXT NOT NULL,
    params JSONB NOT NULL,
    output_url TEXT NOT NULL,
    batch_size INTEGER NOT NULL CHECK (batch_size > 0),
    priority INTEGER NOT NULL DEFAULT 0,
    seed BIGINT NOT NULL,
    max_attempts INTEGER NOT NULL CHECK (max_attempts > 0),
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    total_prompts BIGINT NOT NULL,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ
);
CREATE INDEX jobs_active ON jobs (model, priority DESC, created_at) WHERE state IN ('queued', 'running');
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);

CREATE TABLE prompts (
    job_id UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    seed BIGINT NOT NULL,
    extra JSONB,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE tasks (
    id BIGSERIAL PRIMARY KEY,
    job_id UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    first_idx BIGINT NOT NULL,
    count INTEGER NOT NULL CHECK (count > 0),
    params JSONB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'leased', 'succeeded', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    lease_token UUID,
    leased_by TEXT,
    lease_expires_at TIMESTAMPTZ,
    available_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error TEXT,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX tasks_pending ON tasks (job_id, id) WHERE state = 'pending';
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE state = 'leased';
CREATE INDEX tasks_job_state ON tasks (job_id, state) INCLUDE (count);

CREATE TABLE outputs (
    job_id UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    task_id BIGINT NOT NULL,
    object_key TEXT NOT NULL,
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    worker TEXT NOT NULL,
    metadata JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    models JSONB NOT NULL,
    device TEXT NOT NULL,
    max_batch INTEGER NOT NULL,
    loaded_model TEXT,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
