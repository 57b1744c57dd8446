-- pgml-proxy migration 0006: pgml.models.runtime is the extension's pgml.runtime enum, the
-- registry views show it where the extension's do, and each set-returning function has a row
-- type. Clients written against the extension compare runtime with the enum (korvus: `WHERE
-- runtime = $2::pgml.runtime`), which text cannot be compared with. The views depend on the
-- column, so they are dropped and made again around the change.

DROP VIEW IF EXISTS pgml.overview, pgml.trained_models, pgml.deployed_models;

ALTER TABLE pgml.models ALTER COLUMN runtime DROP DEFAULT;
ALTER TABLE pgml.models ALTER COLUMN runtime TYPE pgml.runtime USING runtime::pgml.runtime;
ALTER TABLE pgml.models ALTER COLUMN runtime SET DEFAULT 'python'::pgml.runtime;

-- The current deployment of a project is its newest row (deployments are append-only);
-- id breaks ties between rows written in one transaction.
CREATE VIEW pgml.overview AS
SELECT p.name, d.created_at AS deployed_at, p.task, m.algorithm, m.runtime, s.relation_name,
       s.y_column_name, s.test_sampling, s.test_size
FROM pgml.projects p
JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
      FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.project_id = p.id
JOIN pgml.models m ON m.id = d.model_id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
ORDER BY p.name ASC;

CREATE VIEW pgml.trained_models AS
SELECT m.id, p.name, p.task, m.algorithm, m.runtime, m.created_at, s.test_sampling, s.test_size,
       d.model_id IS NOT NULL AS deployed
FROM pgml.projects p
JOIN pgml.models m ON p.id = m.project_id
JOIN pgml.snapshots s ON s.id = m.snapshot_id
LEFT JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
           FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.model_id = m.id
ORDER BY m.created_at DESC;

CREATE VIEW pgml.deployed_models AS
SELECT m.id, p.name, p.task, m.algorithm, m.runtime, d.created_at AS deployed_at
FROM pgml.projects p
JOIN (SELECT DISTINCT ON (project_id) project_id, model_id, created_at
      FROM pgml.deployments ORDER BY project_id, created_at DESC, id DESC) d ON d.project_id = p.id
JOIN pgml.models m ON m.id = d.model_id
ORDER BY p.name ASC;

-- One row of each set-returning pgml function, as a composite type: the value of such a call
-- outside FROM (`SELECT id, pgml.chunk(...) AS c FROM docs`, then `(c).chunk_index`), which the
-- planner builds with ROW(...)::pgml._chunk_row. tests/test_planner_srf.py checks that this list
-- matches core/functions.py.
DO $$ BEGIN CREATE TYPE pgml._transform_stream_row AS (transform_stream jsonb);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._embed_row AS (embed real[]);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._rank_row AS (corpus_id bigint, score float8, text text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._chunk_row AS (chunk_index bigint, chunk text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._train_row AS (project text, task text, algorithm text, deployed bool);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._train_joint_row AS (project text, task text, algorithm text, deployed bool);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._snapshot_row AS (relation text, y_column_name text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._predict_batch_row AS (predict_batch real);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._deploy_row AS (project text, strategy text, algorithm text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._load_dataset_row AS (table_name text, rows bigint);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._tune_row AS (status text, task text, algorithm text, deployed bool);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE TYPE pgml._python_pip_freeze_row AS (package text);
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
