// JDBC (pgjdbc) cases for the direct-vs-proxy harness (tests/test_drivers_jdbc.py).
//
// Usage: java -cp postgresql.jar:. DriverCases TABLE CASES LABEL=JDBC_URL...
// Prints one JSON object {label: {case: [observation, ...]}} on stdout. An observation is what a user of
// the driver sees: column labels, type names, the result format (0 text, 1 binary), values as
// getString gives them, update counts, SQLSTATEs. Nothing run-specific (pids, times, table names)
// is printed, so direct and proxied runs must print the same. Each case runs on its own connection
// so that one case's failure does not hide the others.

import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.PGResultSetMetaData;
import org.postgresql.largeobject.LargeObject;
import org.postgresql.largeobject.LargeObjectManager;

public class DriverCases {
    interface Case { void run(Connection c, List<String> out) throws Exception; }

    static String url;
    static String table;

    static void rows(ResultSet rs, List<String> out) throws SQLException {
        ResultSetMetaData md = rs.getMetaData();
        PGResultSetMetaData pg = md.unwrap(PGResultSetMetaData.class);
        StringBuilder head = new StringBuilder("cols");
        for (int i = 1; i <= md.getColumnCount(); i++) {
            head.append(' ').append(md.getColumnLabel(i)).append(':').append(md.getColumnTypeName(i))
                .append(':').append(pg.getFormat(i));
        }
        out.add(head.toString());
        while (rs.next()) {
            StringBuilder row = new StringBuilder("row");
            for (int i = 1; i <= md.getColumnCount(); i++) {
                // getString on a binary bytea gives the array's identity; print its bytes instead
                Object v = "bytea".equals(md.getColumnTypeName(i)) ? hex(rs.getBytes(i)) : rs.getString(i);
                row.append(" | ").append(v);
            }
            out.add(row.toString());
        }
    }

    static String hex(byte[] b) {
        if (b == null) return null;
        StringBuilder h = new StringBuilder("\\x");
        for (byte x : b) h.append(String.format("%02x", x));
        return h.toString();
    }

    static void query(Connection c, String sql, List<String> out) throws SQLException {
        try (Statement st = c.createStatement()) {
            boolean isResult = st.execute(sql);
            while (true) {
                if (isResult) {
                    try (ResultSet rs = st.getResultSet()) { rows(rs, out); }
                } else {
                    int n = st.getUpdateCount();
                    if (n == -1) break;
                    out.add("count " + n);
                }
                isResult = st.getMoreResults();
            }
        }
    }

    static void expectError(List<String> out, Case body, Connection c) {
        try {
            body.run(c, out);
            out.add("no error");
        } catch (SQLException e) {
            out.add("error " + e.getSQLState());
        } catch (Exception e) {
            out.add("exception " + e.getClass().getSimpleName());
        }
    }

    static final LinkedHashMap<String, Case> CASES = new LinkedHashMap<>();
    static {
        CASES.put("types", (c, out) -> query(c,
            "SELECT 1::int4 AS i4, (2^40)::int8 AS i8, 1.5::numeric AS num, 'héllo'::text AS t, "
            + "'2024-02-29'::date AS d, '12:34:56'::time AS tm, NULL::text AS n, ARRAY[1,2]::int[] AS arr, "
            + "'\\x01ff'::bytea AS b, true AS bool, '{\"a\": 1}'::jsonb AS j, 2.5::float8 AS f8, "
            + "'00000000-0000-0000-0000-000000000007'::uuid AS u", out));
        CASES.put("multi_statement", (c, out) -> query(c,
            "SELECT 1 AS a; SELECT 'two' AS b, 3 AS c; SET application_name = 'jdbc'; SHOW application_name", out));
        CASES.put("prepared_past_threshold", (c, out) -> {
            query(c, "CREATE TABLE " + table + " (id int PRIMARY KEY, v text, n numeric)", out);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " VALUES (?, ?, ?)")) {
                for (int i = 1; i <= 8; i++) {
                    ins.setInt(1, i); ins.setString(2, "v" + i); ins.setBigDecimal(3, new java.math.BigDecimal(i + ".25"));
                    out.add("count " + ins.executeUpdate());
                }
            }
            try (PreparedStatement sel = c.prepareStatement("SELECT id, v, n, now() IS NOT NULL AS ok FROM " + table + " WHERE id <= ? ORDER BY id")) {
                for (int i = 1; i <= 8; i++) {
                    sel.setInt(1, i % 3 + 1);
                    try (ResultSet rs = sel.executeQuery()) { rows(rs, out); }
                }
            }
            query(c, "DROP TABLE " + table, out);
        });
        CASES.put("batch_insert", (c, out) -> {
            query(c, "CREATE TABLE " + table + " (id int PRIMARY KEY, v text)", out);
            try (PreparedStatement ins = c.prepareStatement("INSERT INTO " + table + " VALUES (?, ?)")) {
                for (int i = 1; i <= 120; i++) { ins.setInt(1, i); ins.setString(2, "row" + i); ins.addBatch(); }
                out.add("batch " + Arrays.toString(ins.executeBatch()));
            }
            try (Statement st = c.createStatement()) {
                st.addBatch("UPDATE " + table + " SET v = 'u' WHERE id <= 10");
                st.addBatch("DELETE FROM " + table + " WHERE id > 100");
                out.add("batch " + Arrays.toString(st.executeBatch()));
            }
            try (PreparedStatement bad = c.prepareStatement("INSERT INTO " + table + " VALUES (?, 'dup')")) {
                bad.setInt(1, 200); bad.addBatch(); bad.setInt(1, 1); bad.addBatch();
                expectError(out, (cc, o) -> o.add("batch " + Arrays.toString(bad.executeBatch())), c);
            }
            query(c, "SELECT count(*), sum(id), min(v), max(v) FROM " + table, out);
            query(c, "DROP TABLE " + table, out);
        });
        CASES.put("fetchsize_cursor", (c, out) -> {
            c.setAutoCommit(false);
            try (Statement a = c.createStatement(); Statement b = c.createStatement()) {
                a.setFetchSize(10); b.setFetchSize(7);
                try (ResultSet ra = a.executeQuery("SELECT g, md5(g::text) FROM generate_series(1, 95) g");
                     ResultSet rb = b.executeQuery("SELECT g * 2 FROM generate_series(1, 40) g")) {
                    long sa = 0, sb = 0; int na = 0, nb = 0;
                    while (ra.next()) { sa += ra.getLong(1); na++; if (rb.next()) { sb += rb.getLong(1); nb++; } }
                    out.add("a " + na + " " + sa + " b " + nb + " " + sb);
                }
            }
            try (PreparedStatement p = c.prepareStatement("SELECT g FROM generate_series(1, ?) g")) {
                p.setFetchSize(25);
                for (int round = 0; round < 7; round++) {
                    p.setInt(1, 60 + round);
                    int n = 0;
                    try (ResultSet rs = p.executeQuery()) { while (rs.next()) n++; }
                    out.add("prepared fetch " + n);
                }
            }
            c.commit();
        });
        CASES.put("transactions", (c, out) -> {
            query(c, "CREATE TABLE " + table + " (a int)", out);
            c.setAutoCommit(false);
            query(c, "INSERT INTO " + table + " VALUES (1)", out);
            c.rollback();
            query(c, "INSERT INTO " + table + " VALUES (2)", out);
            Savepoint sp = c.setSavepoint();
            expectError(out, (cc, o) -> query(cc, "SELECT 1/0", o), c);
            c.rollback(sp);
            query(c, "INSERT INTO " + table + " VALUES (3)", out);
            c.commit();
            expectError(out, (cc, o) -> query(cc, "SELECT * FROM no_such_table_jdbc", o), c);
            expectError(out, (cc, o) -> query(cc, "SELECT 1", o), c);  // 25P02: the transaction is aborted
            c.rollback();
            query(c, "SELECT array_agg(a ORDER BY a) FROM " + table, out);
            query(c, "DROP TABLE " + table, out);
            c.commit();
        });
        CASES.put("errors", (c, out) -> {
            expectError(out, (cc, o) -> query(cc, "SELEC 1", o), c);
            try (PreparedStatement p = c.prepareStatement("SELECT 10 / ?")) {
                for (int i = 0; i < 7; i++) {
                    p.setInt(1, i % 2);
                    expectError(out, (cc, o) -> { try (ResultSet rs = p.executeQuery()) { rows(rs, o); } }, c);
                }
            }
            query(c, "SELECT 'still here' AS s", out);
        });
        CASES.put("metadata", (c, out) -> {
            query(c, "CREATE TABLE " + table + " (id int PRIMARY KEY, v varchar(20) NOT NULL)", out);
            DatabaseMetaData md = c.getMetaData();
            try (ResultSet rs = md.getColumns(null, "public", table, null)) {
                while (rs.next()) out.add("column " + rs.getString("COLUMN_NAME") + " " + rs.getString("TYPE_NAME")
                    + " " + rs.getInt("COLUMN_SIZE") + " " + rs.getString("IS_NULLABLE"));
            }
            try (ResultSet rs = md.getPrimaryKeys(null, "public", table)) {
                while (rs.next()) out.add("pk " + rs.getString("COLUMN_NAME"));
            }
            query(c, "DROP TABLE " + table, out);
        });
        CASES.put("large_object", (c, out) -> {
            c.setAutoCommit(false);
            LargeObjectManager lom = c.unwrap(PGConnection.class).getLargeObjectAPI();
            long oid = lom.createLO(LargeObjectManager.READWRITE);
            try (LargeObject lo = lom.open(oid, LargeObjectManager.READWRITE)) {
                lo.write("large object bytes".getBytes("UTF-8"));
                lo.seek(0);
                out.add("read " + new String(lo.read(100), "UTF-8") + " size " + lo.size());
            }
            lom.delete(oid);
            c.commit();
        });
        CASES.put("pgml", (c, out) -> {
            try (PreparedStatement p = c.prepareStatement(
                    "SELECT pgml.cosine_similarity(?::float4[], ARRAY[1, 2, 4]::float4[]) AS sim")) {
                for (int i = 0; i < 7; i++) {
                    p.setArray(1, c.createArrayOf("float4", new Float[] {1f, 2f, 3f + i}));
                    try (ResultSet rs = p.executeQuery()) { rows(rs, out); }
                }
            }
        });
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\').append(ch);
            else if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
            else b.append(ch);
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        // args: TABLE CASES(comma-separated, or "all") LABEL=JDBC_URL ...; prints {label: {case: [...]}}
        table = args[0];
        Set<String> only = new HashSet<>(Arrays.asList(args[1].split(",")));
        StringBuilder doc = new StringBuilder("{");
        for (String target : Arrays.asList(args).subList(2, args.length)) {
            String label = target.substring(0, target.indexOf('='));
            url = target.substring(target.indexOf('=') + 1);
            if (doc.length() > 1) doc.append(",\n");
            doc.append(json(label)).append(": {");
            boolean first = true;
            for (Map.Entry<String, Case> e : CASES.entrySet()) {
                if (!only.contains("all") && !only.contains(e.getKey())) continue;
                List<String> out = new ArrayList<>();
                try (Connection c = DriverManager.getConnection(url); Statement st = c.createStatement()) {
                    st.execute("DROP TABLE IF EXISTS " + table);  // left by a case that failed midway
                } catch (SQLException ex) {
                    // the case itself will show what is wrong with this target
                }
                try (Connection c = DriverManager.getConnection(url)) {
                    e.getValue().run(c, out);
                } catch (SQLException ex) {
                    out.add("failed " + ex.getSQLState() + " " + ex.getMessage());
                }
                doc.append(first ? "" : ",\n").append(json(e.getKey())).append(": [");
                first = false;
                for (int i = 0; i < out.size(); i++) doc.append(i > 0 ? ", " : "").append(json(out.get(i)));
                doc.append("]");
            }
            doc.append("}");
        }
        System.out.println(doc.append("}"));
    }
}
