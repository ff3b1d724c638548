"""SQL scoring on hand-made rows, checked against sqlite3 itself and by hand."""

import sqlite3

import pytest

from qlora.sql_eval import exact_match, normalize_sql, runs_on_schema, score

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR); CREATE TABLE dept (id INTEGER, budget REAL)"
ROWS = [
    {"context": SCHEMA, "question": "How many heads are older than 56?",
     "answer": "SELECT COUNT(*) FROM head WHERE age > 56"},
    {"context": SCHEMA, "question": "Budget of department 3?",
     "answer": "SELECT budget FROM dept WHERE id = 3"},
    {"context": SCHEMA, "question": "Names of heads?", "answer": "SELECT name FROM head"},
]


def test_exact_match_ignores_case_whitespace_and_semicolon():
    assert exact_match("select  count(*) from HEAD where age>56;", ROWS[0]["answer"])
    assert not exact_match("SELECT COUNT(*) FROM head WHERE age > 57", ROWS[0]["answer"])
    assert normalize_sql(" SELECT a,b FROM t ; ") == "select a , b from t"


def test_runs_on_schema_uses_the_create_table_context():
    assert runs_on_schema("SELECT age FROM head", SCHEMA)
    assert not runs_on_schema("SELECT salary FROM head", SCHEMA)       # no such column
    assert not runs_on_schema("SELECT * FROM nowhere", SCHEMA)         # no such table
    assert not runs_on_schema("SELEC age FROM head", SCHEMA)           # syntax error


def test_empty_or_comment_only_output_does_not_run():
    # sqlite3 itself executes these without error; an answer must be a query with a result.
    sqlite3.connect(":memory:").execute("-- nothing")
    for sql in ["", "   ", "-- nothing", "/* x */"]:
        assert not runs_on_schema(sql, SCHEMA)


def test_score_counts_hand_checked_rows():
    predictions = ["select count(*) from head where age > 56",   # exact and runs
                   "SELECT budget FROM dept WHERE id = 4",         # runs, not exact
                   "SELECT nam FROM head"]                         # neither
    s = score(ROWS, predictions)
    assert (s.rows, s.exact, s.runs) == (3, 1, 2)
    assert "33.3%" in s.table() and "66.7%" in s.table()


def test_bad_context_and_length_mismatch_raise():
    with pytest.raises(ValueError, match="CREATE TABLE"):
        runs_on_schema("SELECT 1", "this is not sql")
    with pytest.raises(ValueError, match="3 rows but 2 predictions"):
        score(ROWS, ["a", "b"])
