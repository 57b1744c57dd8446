-- pgml-proxy migration 0007: the SQL notebooks of PostgresML's dashboard, under the names and
-- columns its migrations give them (pgml-dashboard/migrations/20221125201109_notebook.up.sql),
-- so a database that already has them keeps its notebooks. cell_type 3 is an SQL cell, 1 a
-- Markdown one, as upstream numbers them. Notebooks are shared by every role, as upstream's
-- single-user dashboard shares them; the cells' SQL runs with the privileges of whoever runs it.
CREATE TABLE IF NOT EXISTS pgml.notebooks (
    id BIGSERIAL PRIMARY KEY,
    name VARCHAR NOT NULL,
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL DEFAULT NOW()
);

CREATE TABLE IF NOT EXISTS pgml.notebook_cells (
    id BIGSERIAL PRIMARY KEY,
    notebook_id BIGINT NOT NULL REFERENCES pgml.notebooks(id),
    cell_type INT NOT NULL,
    cell_number INT NOT NULL,
    version INT NOT NULL,
    contents TEXT NOT NULL,
    rendering TEXT,
    execution_time INTERVAL,
    deleted_at TIMESTAMP WITHOUT TIME ZONE
);

GRANT SELECT, INSERT, UPDATE ON pgml.notebooks, pgml.notebook_cells TO PUBLIC;
GRANT USAGE ON SEQUENCE pgml.notebooks_id_seq, pgml.notebook_cells_id_seq TO PUBLIC;
