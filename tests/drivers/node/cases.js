// node-postgres (npm `pg`) cases for the direct-vs-proxy harness (tests/test_drivers_node.py).
//
// Usage: node cases.js TABLE LABEL=postgresql://... ...
// Prints {label: {case: [observation, ...]}}: command tags, row counts, field names, type OIDs,
// result formats, rows, SQLSTATEs. Nothing run-specific is printed, so every target must print
// the same. Each case runs on its own client (or pool) so one failure does not hide the others.
'use strict';
const pg = require('pg');

function result(r) {
  return {
    command: r.command, rowCount: r.rowCount,
    fields: r.fields.map((f) => [f.name, f.dataTypeID, f.format]),
    rows: r.rows.map((row) => (Array.isArray(row) ? row : Object.values(row)).map(show)),
  };
}

function show(v) {
  if (v === null) return null;
  if (Buffer.isBuffer(v)) return 'buffer:' + v.toString('hex');
  if (v instanceof Date) return 'date:' + v.toISOString();
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

async function attempt(out, fn) {
  try {
    await fn();
    out.push('no error');
  } catch (e) {
    out.push('error ' + (e.code || e.message));
  }
}

const TYPES = "SELECT 1::int4 AS i4, (2^40)::int8 AS i8, 1.5::numeric AS num, 'héllo'::text AS t, "
  + "'2024-02-29'::date AS d, NULL::text AS n, ARRAY[1,2]::int[] AS arr, '\\x01ff'::bytea AS b, "
  + "true AS bool, '{\"a\": 1}'::jsonb AS j, 2.5::float8 AS f8, "
  + "'00000000-0000-0000-0000-000000000007'::uuid AS u";

const CASES = {
  async types(c, out) {
    out.push(result(await c.query(TYPES)));
    out.push(result(await c.query({ text: TYPES, rowMode: 'array' })));
    // binary results (pg asks for format 1 on every column; it decodes few types, so compare raw)
    const bin = await c.query({ text: 'SELECT $1::int4 + 1 AS n, $2::text AS t', values: [41, 'b'], binary: true });
    out.push({ fields: bin.fields.map((f) => [f.name, f.dataTypeID, f.format]),
      rows: bin.rows.map((r) => Object.values(r).map(show)) });
  },
  async simple_multi(c, out) {
    const rs = await c.query("SELECT 1 AS a; SELECT 'two' AS b; SET application_name = 'node'; SHOW application_name");
    for (const r of rs) out.push(result(r));
  },
  async named_prepared(c, out, table) {
    out.push(result(await c.query(`CREATE TABLE ${table} (id int PRIMARY KEY, v text)`)));
    for (let i = 1; i <= 8; i++) {
      out.push(result(await c.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2)`, values: [i, 'v' + i] })));
    }
    for (let i = 1; i <= 6; i++) {
      out.push(result(await c.query({ name: 'sel', text: `SELECT id, v FROM ${table} WHERE id <= $1 ORDER BY id`, values: [i % 3 + 1] })));
    }
    out.push(result(await c.query({ name: 'upd', text: `UPDATE ${table} SET v = $1 WHERE id > $2`, values: ['u', 5] })));
    out.push(result(await c.query(`DELETE FROM ${table} WHERE id = 1`)));
    out.push(result(await c.query(`DROP TABLE ${table}`)));
  },
  async transactions(c, out, table) {
    out.push(result(await c.query(`CREATE TABLE ${table} (a int)`)));
    out.push(result(await c.query('BEGIN')));
    out.push(result(await c.query(`INSERT INTO ${table} VALUES (1)`)));
    out.push(result(await c.query('ROLLBACK')));
    out.push(result(await c.query('BEGIN')));
    out.push(result(await c.query({ name: 'ins2', text: `INSERT INTO ${table} VALUES ($1)`, values: [2] })));
    out.push(result(await c.query('SAVEPOINT s')));
    await attempt(out, () => c.query('SELECT 1/0'));
    await attempt(out, () => c.query('SELECT 1'));
    out.push(result(await c.query('ROLLBACK TO SAVEPOINT s')));
    out.push(result(await c.query({ name: 'ins2', text: `INSERT INTO ${table} VALUES ($1)`, values: [3] })));
    out.push(result(await c.query('COMMIT')));
    out.push(result(await c.query(`SELECT array_agg(a ORDER BY a) AS a FROM ${table}`)));
    out.push(result(await c.query(`DROP TABLE ${table}`)));
  },
  async errors(c, out) {
    await attempt(out, () => c.query('SELEC 1'));
    for (let i = 0; i < 4; i++) {
      await attempt(out, () => c.query({ name: 'div', text: 'SELECT 10 / $1::int AS q', values: [i % 2] }));
    }
    await attempt(out, () => c.query('SELECT $1::int', ['not a number']));
    out.push(result(await c.query("SELECT 'still here' AS s")));
  },
  async pool(c, out, table, url) {
    // pg.Pool: 12 concurrent queries on at most 3 connections, a transaction on a checked-out client
    const p = new pg.Pool({ connectionString: url, max: 3 });
    try {
      const many = await Promise.all(Array.from({ length: 12 }, (_, i) =>
        p.query({ name: 'pooled', text: 'SELECT $1::int * 2 AS d, pg_sleep(0.01) IS NOT NULL AS s', values: [i] })));
      out.push(many.map((r) => r.rows[0].d));
      const client = await p.connect();
      try {
        await client.query(`CREATE TABLE ${table} (a int)`);
        await client.query('BEGIN');
        await client.query(`INSERT INTO ${table} SELECT generate_series(1, 50)`);
        out.push(result(await client.query(`SELECT count(*) AS n FROM ${table}`)));
        await client.query('COMMIT');
      } finally {
        client.release();
      }
      out.push(result(await p.query(`SELECT sum(a) AS s FROM ${table}`)));
      await p.query(`DROP TABLE ${table}`);
    } finally {
      await p.end();
    }
  },
  async pgml(c, out) {
    for (let i = 0; i < 6; i++) {
      out.push(result(await c.query({ name: 'cos', text: 'SELECT pgml.cosine_similarity($1::float4[], ARRAY[1, 2, 4]::float4[]) AS sim', values: [[1, 2, 3 + i]] })));
    }
  },
};

async function main() {
  const [table, ...targets] = process.argv.slice(2);
  const doc = {};
  for (const target of targets) {
    const at = target.indexOf('=');
    const label = target.slice(0, at);
    const url = target.slice(at + 1);
    doc[label] = {};
    for (const [name, fn] of Object.entries(CASES)) {
      const out = [];
      const c = new pg.Client({ connectionString: url });
      c.on('error', () => {}); // a dropped connection shows as the case's failure
      try {
        await c.connect();
        await c.query(`DROP TABLE IF EXISTS ${table}`).catch(() => {});
        await fn(c, out, table, url);
      } catch (e) {
        out.push('failed ' + (e.code || '') + ' ' + e.message);
      } finally {
        await c.end().catch(() => {});
      }
      doc[label][name] = out;
    }
  }
  process.stdout.write(JSON.stringify(doc) + '\n');
}

main().catch((e) => { console.error(e); process.exit(1); });
