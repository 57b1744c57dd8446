// Go (database/sql with Debian's lib/pq) cases for the direct-vs-proxy harness
// (tests/test_drivers_go.py). Built with GO111MODULE=off GOPATH=/usr/share/gocode.
//
// Usage: cases TABLE LABEL=postgres://... ...
// Prints {label: {case: [observation, ...]}}: column names and database type names, rows as
// text, rows affected, SQLSTATEs. Nothing run-specific is printed.
package main

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"

	"github.com/lib/pq"
)

type obs = []string

func rows(out *obs, r *sql.Rows) error {
	defer r.Close()
	cols, err := r.ColumnTypes()
	if err != nil {
		return err
	}
	head := "cols"
	for _, c := range cols {
		head += " " + c.Name() + ":" + c.DatabaseTypeName()
	}
	*out = append(*out, head)
	for r.Next() {
		vals := make([]sql.NullString, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := r.Scan(ptrs...); err != nil {
			return err
		}
		line := "row"
		for _, v := range vals {
			if v.Valid {
				line += " | " + v.String
			} else {
				line += " | NULL"
			}
		}
		*out = append(*out, line)
	}
	return r.Err()
}

func code(err error) string {
	if e, ok := err.(*pq.Error); ok {
		return "error " + string(e.Code)
	}
	if err == nil {
		return "no error"
	}
	return "error " + err.Error()
}

// affected(out)(db.Exec(...)) records the rows affected (Go spreads a call's results only alone)
func affected(out *obs) func(sql.Result, error) error {
	return func(res sql.Result, err error) error {
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		*out = append(*out, fmt.Sprintf("affected %d", n))
		return err
	}
}

func query(out *obs, q interface {
	Query(string, ...any) (*sql.Rows, error)
}, text string, args ...any) error {
	r, err := q.Query(text, args...)
	if err != nil {
		return err
	}
	return rows(out, r)
}

var cases = map[string]func(db *sql.DB, table string, out *obs) error{
	"types": func(db *sql.DB, _ string, out *obs) error {
		return query(out, db, "SELECT 1::int4 AS i4, (2^40)::int8 AS i8, 1.5::numeric AS num, $1::text AS t, "+
			"'2024-02-29'::date AS d, NULL::text AS n, ARRAY[1,2]::int[] AS arr, '\\x01ff'::bytea AS b, "+
			"true AS bool, '{\"a\": 1}'::jsonb AS j, $2::float8 AS f8", "héllo", 2.5)
	},
	"prepared": func(db *sql.DB, table string, out *obs) error {
		if err := affected(out)(db.Exec("CREATE TABLE " + table + " (id int PRIMARY KEY, v text)")); err != nil {
			return err
		}
		ins, err := db.Prepare("INSERT INTO " + table + " VALUES ($1, $2)")
		if err != nil {
			return err
		}
		defer ins.Close()
		for i := 1; i <= 8; i++ {
			if err := affected(out)(ins.Exec(i, fmt.Sprintf("v%d", i))); err != nil {
				return err
			}
		}
		sel, err := db.Prepare("SELECT id, v FROM " + table + " WHERE id <= $1 ORDER BY id")
		if err != nil {
			return err
		}
		defer sel.Close()
		for i := 1; i <= 6; i++ {
			r, err := sel.Query(i%3 + 1)
			if err != nil {
				return err
			}
			if err := rows(out, r); err != nil {
				return err
			}
		}
		if err := affected(out)(db.Exec("UPDATE "+table+" SET v = $1 WHERE id > $2", "u", 5)); err != nil {
			return err
		}
		return affected(out)(db.Exec("DROP TABLE " + table))
	},
	"transactions": func(db *sql.DB, table string, out *obs) error {
		if err := affected(out)(db.Exec("CREATE TABLE " + table + " (a int)")); err != nil {
			return err
		}
		tx, _ := db.Begin()
		_ = affected(out)(tx.Exec("INSERT INTO "+table+" VALUES ($1)", 1))
		*out = append(*out, code(tx.Rollback()))
		tx, _ = db.Begin()
		_ = affected(out)(tx.Exec("INSERT INTO "+table+" VALUES ($1)", 2))
		_, err := tx.Exec("SELECT 1/0")
		*out = append(*out, code(err))
		_, err = tx.Exec("SELECT 1")
		*out = append(*out, code(err))
		*out = append(*out, code(tx.Rollback()))
		tx, _ = db.Begin()
		_ = affected(out)(tx.Exec("INSERT INTO "+table+" VALUES ($1)", 3))
		*out = append(*out, code(tx.Commit()))
		if err := query(out, db, "SELECT array_agg(a ORDER BY a) FROM "+table); err != nil {
			return err
		}
		return affected(out)(db.Exec("DROP TABLE " + table))
	},
	"copy_in": func(db *sql.DB, table string, out *obs) error {
		if err := affected(out)(db.Exec("CREATE TABLE " + table + " (id int, v text)")); err != nil {
			return err
		}
		tx, _ := db.Begin()
		stmt, err := tx.Prepare(pq.CopyIn(table, "id", "v"))
		if err != nil {
			return err
		}
		for i := 1; i <= 500; i++ {
			if _, err := stmt.Exec(i, fmt.Sprintf("line %d", i)); err != nil {
				return err
			}
		}
		_ = affected(out)(stmt.Exec())
		*out = append(*out, code(stmt.Close()), code(tx.Commit()))
		if err := query(out, db, "SELECT count(*), sum(id), max(v) FROM "+table); err != nil {
			return err
		}
		return affected(out)(db.Exec("DROP TABLE " + table))
	},
	"errors": func(db *sql.DB, _ string, out *obs) error {
		_, err := db.Exec("SELEC 1")
		*out = append(*out, code(err))
		for i := 0; i < 4; i++ {
			err := query(out, db, "SELECT 10 / $1::int", i%2)
			*out = append(*out, code(err))
		}
		_, err = db.Exec("SELECT $1::int", "not a number")
		*out = append(*out, code(err))
		return query(out, db, "SELECT 'still here'")
	},
	"pool": func(db *sql.DB, _ string, out *obs) error {
		// database/sql's own pool: 12 goroutines over at most 3 connections
		db.SetMaxOpenConns(3)
		got := make([]string, 12)
		var wg sync.WaitGroup
		for i := 0; i < 12; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				var s string
				err := db.QueryRow("SELECT ($1::int * 2)::text FROM pg_sleep(0.01)", i).Scan(&s)
				if err != nil {
					s = code(err)
				}
				got[i] = s
			}(i)
		}
		wg.Wait()
		*out = append(*out, strings.Join(got, ","))
		return nil
	},
	"pgml": func(db *sql.DB, _ string, out *obs) error {
		for i := 0; i < 6; i++ {
			v := fmt.Sprintf("{1,2,%d}", 3+i)
			if err := query(out, db, "SELECT pgml.cosine_similarity($1::float4[], ARRAY[1, 2, 4]::float4[]) AS sim", v); err != nil {
				return err
			}
		}
		return nil
	},
}

func main() {
	table := os.Args[1]
	doc := map[string]map[string]obs{}
	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, target := range os.Args[2:] {
		label, url, _ := strings.Cut(target, "=")
		doc[label] = map[string]obs{}
		for _, name := range names {
			out := obs{}
			db, err := sql.Open("postgres", url)
			if err == nil {
				_, _ = db.Exec("DROP TABLE IF EXISTS " + table)
				err = cases[name](db, table, &out)
				db.Close()
			}
			if err != nil {
				out = append(out, "failed "+code(err))
			}
			doc[label][name] = out
		}
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(doc); err != nil {
		panic(err)
	}
}
