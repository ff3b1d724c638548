"""Scoring generated SQL: exact match after normalisation, and whether it runs on the schema.

For a row {context, question, answer} the context holds the CREATE TABLE statements. We build an
in-memory sqlite3 database from them and execute the generated query; a query "runs" when sqlite
accepts it (tables and columns exist, syntax is valid). Empty tables are enough for that check.
"""

import re
import sqlite3
from dataclasses import dataclass


def normalize_sql(sql: str) -> str:
    """Lower-case, collapse whitespace, drop a trailing semicolon, space around punctuation."""
    sql = sql.strip().rstrip(";").strip().lower()
    sql = re.sub(r"\s*([(),=<>])\s*", r" \1 ", sql)
    return re.sub(r"\s+", " ", sql).strip()


def exact_match(predicted: str, reference: str) -> bool:
    return normalize_sql(predicted) == normalize_sql(reference)


def runs_on_schema(sql: str, context: str) -> bool:
    """True if the query `sql` executes on an empty in-memory database made from the CREATE TABLE `context`."""
    db = sqlite3.connect(":memory:")
    try:
        try:
            db.executescript(context)
        except sqlite3.Error as e:
            raise ValueError(f"the context is not valid SQL for sqlite ({e}); it should hold CREATE TABLE "
                             "statements") from None
        try:
            # sqlite accepts an empty string or a lone comment without error; only a statement that
            # returns a result set (a query) counts as an answer that runs.
            return db.execute(sql).description is not None
        except (sqlite3.Error, sqlite3.Warning, ValueError):
            return False
    finally:
        db.close()


@dataclass
class SQLScores:
    rows: int
    exact: int
    runs: int

    @property
    def exact_rate(self) -> float:
        return self.exact / self.rows if self.rows else 0.0

    @property
    def runs_rate(self) -> float:
        return self.runs / self.rows if self.rows else 0.0

    def table(self, model: str = "model", rows: str = "rows") -> str:
        """A markdown table of one labelled row: which model, on which rows, and its scores."""
        return ("| model | rows | exact match | runs on schema |\n| --- | --- | --- | --- |\n"
                f"| {model} | {self.rows} ({rows}) | {self.exact} ({self.exact_rate:.1%}) "
                f"| {self.runs} ({self.runs_rate:.1%}) |")


def score(rows: list[dict], predictions: list[str]) -> SQLScores:
    """rows: {context, question, answer}; predictions: generated SQL, one per row."""
    if len(rows) != len(predictions):
        raise ValueError(f"{len(rows)} rows but {len(predictions)} predictions")
    exact = sum(exact_match(p, r["answer"]) for r, p in zip(rows, predictions))
    runs = sum(runs_on_schema(p, r["context"]) for r, p in zip(rows, predictions))
    return SQLScores(rows=len(rows), exact=exact, runs=runs)
