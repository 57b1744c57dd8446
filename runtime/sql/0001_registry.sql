-- pgml-proxy migration 0001: the model registry of the pgml schema (tables and views).
-- Column names follow the PostgresML extension (v2.10) so that tools reading
-- pgml.models / pgml.deployed_models directly see what they expect. Plain text
-- replaces the extension's enums: the proxy validates values before writing.

CREATE TABLE IF NOT EXISTS pgml.projects (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    task text NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS pgml.snapshots (
    id bigserial PRIMARY KEY,
    relation_name text NOT NULL,
    y_column_name text[],
    test_size real NOT NULL,
    test_sampling text NOT NULL,
    status text NOT NULL,
    columns jsonb,
    analysis jsonb,
    materialized boolean DEFAULT false,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE IF NOT EXISTS pgml.models (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects(id) ON DELETE CASCADE,
    snapshot_id bigint REFERENCES pgml.snapshots(id) ON DELETE SET NULL,
    num_features integer NOT NULL,
    algorithm text NOT NULL,
    runtime text DEFAULT 'python',
    hyperparams jsonb NOT NULL,
    status text NOT NULL,
    metrics jsonb,
    search text,
    search_params jsonb NOT NULL,
    search_args jsonb NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS models_project_id_idx ON pgml.models (project_id);
CREATE INDEX IF NOT EXISTS models_snapshot_id_idx ON pgml.models (snapshot_id);

CREATE TABLE IF NOT EXISTS pgml.deployments (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES pgml.projects(id) ON DELETE CASCADE,
    model_id bigint NOT NULL REFERENCES pgml.models(id) ON DELETE CASCADE,
    strategy text,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS deployments_project_id_created_at_idx
    ON pgml.deployments (project_id, created_at);

CREATE TABLE IF NOT EXISTS pgml.files (
    id bigserial PRIMARY KEY,
    model_id bigint NOT NULL REFERENCES pgml.models(id) ON DELETE CASCADE,
    path text NOT NULL,
    part integer NOT NULL,
    created_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    updated_at timestamp without time zone NOT NULL DEFAULT clock_timestamp(),
    data bytea NOT NULL,
    UNIQUE (model_id, path, part)
);

CREATE TABLE IF NOT EXISTS pgml.logs (
    id serial PRIMARY KEY,
    model_id bigint,
    project_id bigint,
    created_at timestamp without time zone DEFAULT clock_timestamp(),
    logs jsonb
);

-- The current deployment of a project is its newest row (deployments are append-only);
-- id breaks ties between rows written in one transaction.
CREATE OR REPLACE VIEW pgml.overview AS
SELECT p.name, d.created_at AS deployed_at, p.task, m.algorithm, s.relation_name,
       s.y_column_name, s.test_sampling, s.test_size
FROM pgml.projects p
JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
      FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.project_id = p.id
JOIN pgml.models m ON m.id = d.model_id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
ORDER BY p.name ASC;

CREATE OR REPLACE VIEW pgml.trained_models AS
SELECT m.id, p.name, p.task, m.algorithm, m.created_at, s.test_sampling, s.test_size,
       d.model_id IS NOT NULL AS deployed
FROM pgml.projects p
JOIN pgml.models m ON p.id = m.project_id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
LEFT JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
           FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.model_id = m.id
ORDER BY m.created_at DESC;

CREATE OR REPLACE VIEW pgml.deployed_models AS
SELECT m.id, p.name, p.task, m.algorithm, d.created_at AS deployed_at
FROM pgml.projects p
JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
      FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.project_id = p.id
JOIN pgml.models m ON m.id = d.model_id
ORDER BY p.name ASC;
