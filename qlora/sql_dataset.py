"""A small text-to-SQL dataset made by code, so the default training job needs no download.

Rows have the fields of know_sql / sql-create-context ({context, question, answer}, type
"context_qa"): the context is one or two CREATE TABLE statements joined by "; ", the question is
English, the answer is the SELECT statement that answers it on that schema. Questions come from a
dozen templates (counts, lookups, aggregates, filters, grouping, ordering, a join) over synthetic
tables; each context lists the columns the query needs plus a few distractors, in random order.
The same seed gives the same rows; every answer runs on its schema in sqlite3 (tests/test_data.py).

    python -m qlora.sql_dataset --rows 3000 --seed 0 --out sql.jsonl
"""

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from qlora.atomic import write_text

DEFAULT_ROWS = 3000


@dataclass(frozen=True)
class Column:
    name: str
    type: str                            # INTEGER, REAL or VARCHAR
    values: tuple = ()                   # text values questions may mention
    low: int = 0                         # numeric range questions may mention
    high: int = 100

    @property
    def text(self) -> str:               # how a question says it: hire_year -> "hire year"
        return self.name.replace("_", " ")

    @property
    def numeric(self) -> bool:
        return self.type != "VARCHAR"


@dataclass(frozen=True)
class Table:
    name: str
    singular: str                        # "employee"
    plural: str                          # "employees"
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Denver", "Oslo", "Cairo", "Perth", "Quito", "Hanoi")
NAMES = ("Alice Moreau", "Bo Chen", "Carla Diaz", "Dev Patel", "Emeka Obi", "Freya Lund", "Gus Kim",
         "Hana Sato", "Ivan Petrov", "Jade Wu", "Kofi Mensah", "Lena Braun")
COUNTRIES = ("France", "Nigeria", "Peru", "Japan", "Norway", "Egypt", "Chile", "Kenya", "Canada", "India")

TABLES = (
    Table("employee", "employee", "employees", (
        Column("name", "VARCHAR", NAMES),
        Column("department", "VARCHAR", ("Sales", "Research", "Legal", "Support", "Finance")),
        Column("city", "VARCHAR", CITIES), Column("salary", "INTEGER", low=30000, high=150000),
        Column("age", "INTEGER", low=20, high=65), Column("hire_year", "INTEGER", low=1990, high=2024))),
    Table("student", "student", "students", (
        Column("name", "VARCHAR", NAMES),
        Column("major", "VARCHAR", ("Biology", "History", "Physics", "Economics", "Art")),
        Column("hometown", "VARCHAR", CITIES), Column("gpa", "REAL", low=1, high=4),
        Column("age", "INTEGER", low=17, high=30), Column("credits", "INTEGER", low=0, high=200))),
    Table("film", "film", "films", (
        Column("title", "VARCHAR", ("Red Harbor", "Night Train", "Blue Orchard", "Iron Valley", "Glass River")),
        Column("director", "VARCHAR", NAMES),
        Column("genre", "VARCHAR", ("Drama", "Comedy", "Horror", "Western", "Documentary")),
        Column("release_year", "INTEGER", low=1950, high=2024), Column("runtime", "INTEGER", low=70, high=200),
        Column("box_office", "REAL", low=1, high=900))),
    Table("player", "player", "players", (
        Column("name", "VARCHAR", NAMES), Column("team", "VARCHAR", ("Hawks", "Rovers", "Comets", "Tigers", "Pilots")),
        Column("position", "VARCHAR", ("Goalkeeper", "Defender", "Midfielder", "Forward")),
        Column("country", "VARCHAR", COUNTRIES), Column("goals", "INTEGER", low=0, high=60),
        Column("age", "INTEGER", low=17, high=40))),
    Table("book", "book", "books", (
        Column("title", "VARCHAR", ("Salt Roads", "The Long Field", "Paper Moons", "Quiet Engines", "Winter Maps")),
        Column("author", "VARCHAR", NAMES),
        Column("publisher", "VARCHAR", ("Penguin", "Orbit", "Vintage", "Tor", "Faber")),
        Column("pages", "INTEGER", low=80, high=1200), Column("year", "INTEGER", low=1900, high=2024),
        Column("price", "REAL", low=5, high=80))),
    Table("airport", "airport", "airports", (
        Column("name", "VARCHAR", ("North Field", "Bay Point", "Lakeside", "Summit", "Harbor View")),
        Column("city", "VARCHAR", CITIES), Column("country", "VARCHAR", COUNTRIES),
        Column("runways", "INTEGER", low=1, high=8), Column("passengers", "INTEGER", low=10000, high=90000000),
        Column("elevation", "INTEGER", low=0, high=4000))),
    Table("product", "product", "products", (
        Column("name", "VARCHAR", ("Desk Lamp", "Kettle", "Backpack", "Monitor", "Headphones")),
        Column("category", "VARCHAR", ("Home", "Kitchen", "Travel", "Electronics", "Garden")),
        Column("brand", "VARCHAR", ("Acme", "Northwind", "Globex", "Initech", "Umbrella")),
        Column("price", "REAL", low=3, high=2000), Column("stock", "INTEGER", low=0, high=5000),
        Column("rating", "REAL", low=1, high=5))),
    Table("hospital", "hospital", "hospitals", (
        Column("name", "VARCHAR", ("St Mary", "General", "Riverside", "Mercy", "Hillcrest")),
        Column("city", "VARCHAR", CITIES), Column("type", "VARCHAR", ("Public", "Private", "Teaching")),
        Column("beds", "INTEGER", low=20, high=2000), Column("doctors", "INTEGER", low=5, high=900),
        Column("founded", "INTEGER", low=1850, high=2020))),
)

# Joins: child.fk = parent.id, and how a question names the parent ("the employee's department").
DEPARTMENT = Table("department", "department", "departments", (
    Column("dept_name", "VARCHAR", ("Sales", "Research", "Legal", "Support", "Finance")),
    Column("budget", "INTEGER", low=10000, high=5000000), Column("floor", "INTEGER", low=1, high=40)))
SCHOOL = Table("school", "school", "schools", (
    Column("school_name", "VARCHAR", ("Elm High", "Westbrook", "Central Academy", "Oak Ridge", "Lakeview")),
    Column("district", "VARCHAR", ("North", "South", "East", "West")),
    Column("enrollment", "INTEGER", low=100, high=5000)))
STUDIO = Table("studio", "studio", "studios", (
    Column("studio_name", "VARCHAR", ("Bright Lion", "Silver Gate", "Paper Crane", "Lighthouse", "Redwood")),
    Column("country", "VARCHAR", COUNTRIES), Column("founded", "INTEGER", low=1910, high=2020)))
JOINS = ((TABLES[0], "department_id", DEPARTMENT), (TABLES[1], "school_id", SCHOOL), (TABLES[2], "studio_id", STUDIO))


def _literal(column: Column, rng: random.Random):
    """A value for a WHERE clause: (as SQL, as a question says it)."""
    if column.numeric:
        value = rng.randint(column.low, column.high)
        return str(value), str(value)
    value = rng.choice(column.values)
    return "'" + value.replace("'", "''") + "'", value


def _create_table(table: Table, used: list[Column], rng: random.Random, extra: tuple[str, ...] = ()) -> str:
    """CREATE TABLE with the columns the query uses, some distractors and `extra` lines, shuffled."""
    others = [c for c in table.columns if c not in used]
    columns = used + rng.sample(others, rng.randint(0, min(3, len(others))))
    lines = [f"{c.name} {c.type}" for c in columns] + list(extra)
    rng.shuffle(lines)
    return f"CREATE TABLE {table.name} ({', '.join(lines)})"


# ----------------------------------------------------------------------------- question templates
# Each returns (question, answer, columns the answer uses).

def _count_where(t: Table, rng: random.Random):
    c = rng.choice(t.columns)
    sql, said = _literal(c, rng)
    return (f"How many {t.plural} have {c.text} equal to {said}?",
            f"SELECT COUNT(*) FROM {t.name} WHERE {c.name} = {sql}", [c])


def _lookup(t: Table, rng: random.Random):
    a, b = rng.sample(t.columns, 2)
    sql, said = _literal(b, rng)
    return (f"What is the {a.text} of the {t.singular} whose {b.text} is {said}?",
            f"SELECT {a.name} FROM {t.name} WHERE {b.name} = {sql}", [a, b])


def _aggregate(t: Table, rng: random.Random):
    num = rng.choice([c for c in t.columns if c.numeric])
    b = rng.choice([c for c in t.columns if c is not num])
    word, fn = rng.choice((("highest", "MAX"), ("lowest", "MIN"), ("average", "AVG"), ("total", "SUM")))
    sql, said = _literal(b, rng)
    return (f"What is the {word} {num.text} of {t.plural} whose {b.text} is {said}?",
            f"SELECT {fn}({num.name}) FROM {t.name} WHERE {b.name} = {sql}", [num, b])


def _filter_compare(t: Table, rng: random.Random):
    num = rng.choice([c for c in t.columns if c.numeric])
    a = rng.choice([c for c in t.columns if c is not num])
    word, op = rng.choice((("greater than", ">"), ("less than", "<"), ("more than", ">"), ("below", "<")))
    sql, said = _literal(num, rng)
    return (f"List the {a.text} of all {t.plural} whose {num.text} is {word} {said}.",
            f"SELECT {a.name} FROM {t.name} WHERE {num.name} {op} {sql}", [a, num])


def _count_distinct(t: Table, rng: random.Random):
    c = rng.choice([c for c in t.columns if not c.numeric])
    return (f"How many different {c.text} values do the {t.plural} have?",
            f"SELECT COUNT(DISTINCT {c.name}) FROM {t.name}", [c])


def _group_most(t: Table, rng: random.Random):
    c = rng.choice([c for c in t.columns if not c.numeric])
    return (f"Which {c.text} has the most {t.plural}?",
            f"SELECT {c.name} FROM {t.name} GROUP BY {c.name} ORDER BY COUNT(*) DESC LIMIT 1", [c])


def _group_count(t: Table, rng: random.Random):
    c = rng.choice([c for c in t.columns if not c.numeric])
    return (f"How many {t.plural} are there for each {c.text}?",
            f"SELECT {c.name}, COUNT(*) FROM {t.name} GROUP BY {c.name}", [c])


def _top_by(t: Table, rng: random.Random):
    num = rng.choice([c for c in t.columns if c.numeric])
    a = rng.choice([c for c in t.columns if c is not num])
    word, order = rng.choice((("highest", "DESC"), ("lowest", "ASC")))
    return (f"What is the {a.text} of the {t.singular} with the {word} {num.text}?",
            f"SELECT {a.name} FROM {t.name} ORDER BY {num.name} {order} LIMIT 1", [a, num])


def _two_conditions(t: Table, rng: random.Random):
    num = rng.choice([c for c in t.columns if c.numeric])
    a, b = rng.sample([c for c in t.columns if c is not num], 2)
    sql_b, said_b = _literal(b, rng)
    sql_n, said_n = _literal(num, rng)
    word, op = rng.choice((("above", ">"), ("under", "<")))
    return (f"Which {a.text} belongs to {t.plural} whose {b.text} is {said_b} and whose {num.text} is {word} {said_n}?",
            f"SELECT {a.name} FROM {t.name} WHERE {b.name} = {sql_b} AND {num.name} {op} {sql_n}", [a, b, num])


def _order_list(t: Table, rng: random.Random):
    a = rng.choice(t.columns)
    num = rng.choice([c for c in t.columns if c.numeric and c is not a])
    word, order = rng.choice((("descending", "DESC"), ("ascending", "ASC")))
    return (f"List the {a.text} of every {t.singular}, sorted by {num.text} in {word} order.",
            f"SELECT {a.name} FROM {t.name} ORDER BY {num.name} {order}", [a, num])


SINGLE_TABLE_TEMPLATES = (_count_where, _lookup, _aggregate, _filter_compare, _count_distinct, _group_most,
                          _group_count, _top_by, _two_conditions, _order_list)


def _join_row(rng: random.Random) -> dict:
    child, fk, parent = rng.choice(JOINS)
    a = rng.choice(child.columns)
    b = rng.choice(parent.columns)
    sql, said = _literal(b, rng)
    context = "; ".join([_create_table(child, [a], rng, extra=(f"{fk} INTEGER",)),
                         _create_table(parent, [b], rng, extra=("id INTEGER",))])
    question = f"What is the {a.text} of each {child.singular} whose {parent.singular} has a {b.text} of {said}?"
    answer = (f"SELECT T1.{a.name} FROM {child.name} AS T1 JOIN {parent.name} AS T2 ON T1.{fk} = T2.id "
              f"WHERE T2.{b.name} = {sql}")
    return {"context": context, "question": question, "answer": answer}


def sql_rows(n: int = DEFAULT_ROWS, seed: int = 0) -> list[dict]:
    """`n` distinct {context, question, answer} rows; the same seed gives the same rows."""
    if n <= 0:
        raise ValueError(f"n must be a positive number of rows, got {n}")
    rng = random.Random(seed)
    rows, seen = [], set()
    for _ in range(50 * n):              # duplicates are rare; this bound only guards against a loop
        if rng.random() < 0.1:
            row = _join_row(rng)
        else:
            table = rng.choice(TABLES)
            question, answer, used = rng.choice(SINGLE_TABLE_TEMPLATES)(table, rng)
            row = {"context": _create_table(table, used, rng), "question": question, "answer": answer}
        key = (row["context"], row["question"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ValueError(f"could only make {len(rows)} distinct rows, asked for {n}")


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSON lines, atomically (qlora/atomic.py: never half-written)."""
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the built-in SQL dataset as JSONL")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="a .jsonl path; without it, print three rows")
    args = parser.parse_args(argv)
    rows = sql_rows(args.rows, args.seed)
    if args.out:
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} rows to {args.out}")
    else:
        for row in rows[:3]:
            print(row)


if __name__ == "__main__":
    main()
