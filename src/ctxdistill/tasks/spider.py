"""SPIDER text-to-SQL: load examples, build the SQLite databases, run queries safely, score predictions.

Layout of a SPIDER root: `examples.jsonl` (one {"db_id", "question", "query", "split"} per line) and
`database/<db_id>/schema.sql` (CREATE TABLE and INSERT statements). Two metrics, as in the SPIDER paper:
execution accuracy (same result rows) and exact set match without values (same clauses, parsed with
sqlglot, literal values ignored).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlglot
from sqlglot import exp

from ctxdistill.core.errors import UserError
from ctxdistill.core.files import read_jsonl_numbered, write_atomic

FIELDS = ("db_id", "question", "query", "split")
Rows = list[tuple]


# ---------------------------------------------------------------- loading and databases

def _valid_db_id(db_id: str) -> bool:
    return bool(db_id) and db_id not in {".", ".."} and "/" not in db_id and "\\" not in db_id


def schema_path(root: str | Path, db_id: str) -> Path:
    """`<root>/database/<db_id>/schema.sql`; a db_id that is not a plain name is a UserError."""
    if not _valid_db_id(db_id):
        raise UserError(f"invalid db_id {db_id!r} (expected a plain directory name)")
    return Path(root) / "database" / db_id / "schema.sql"


def load(root: str | Path) -> list[dict]:
    """Rows {"id", "db_id", "question", "query", "split"} of `<root>/examples.jsonl`; id is `<db_id>-<line>`."""
    root = Path(root)
    path = root / "examples.jsonl"
    rows = []
    for n, raw in read_jsonl_numbered(path, required=FIELDS):
        for key in FIELDS:
            if not isinstance(raw[key], str):
                raise UserError(f"{path}:{n}: field '{key}' must be a string, got {type(raw[key]).__name__}")
        db_id = raw["db_id"]
        if not _valid_db_id(db_id) or not schema_path(root, db_id).is_file():
            raise UserError(f"{path}:{n}: unknown db_id {db_id!r} (no {root / 'database' / db_id / 'schema.sql'})")
        rows.append({"id": f"{db_id}-{n}", **{key: raw[key] for key in FIELDS}})
    return rows


def _read_schema(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"{path}: schema file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a few SPIDER schema files are not UTF-8


def _statements(text: str):
    """(first line number, statement) for each complete SQL statement of a script."""
    buf, start = "", 1
    for n, line in enumerate(text.splitlines(keepends=True), 1):
        if not buf.strip():
            buf, start = "", n
        buf += line
        if sqlite3.complete_statement(buf):
            yield start, buf
            buf = ""
    if buf.strip():
        yield start, buf


def _run_script(conn: sqlite3.Connection, path: Path) -> None:
    """Run schema.sql statement by statement, so a failure names the database and the statement."""
    for line, stmt in _statements(_read_schema(path)):
        try:
            conn.execute(stmt)
        except sqlite3.Error as e:
            shown = " ".join(stmt.split())
            raise UserError(f"{path}:{line}: database {path.parent.name}: sqlite error: {' '.join(str(e).split())} "
                            f"in statement {shown[:80] + ('...' if len(shown) > 80 else '')!r}") from None


def _clean_create(sql: str) -> str:
    """One CREATE statement with runs of whitespace collapsed, its body indented by two spaces."""
    lines = [" ".join(line.split()) for line in sql.strip().rstrip(";").splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines[:1] + [line if line.startswith(")") else "  " + line for line in lines[1:]]) + ";"


def schema_text(root: str | Path, db_id: str) -> str:
    """The CREATE TABLE statements of a database (no INSERTs), as SQLite stores them, for prompts."""
    path = schema_path(root, db_id)
    with closing(sqlite3.connect(":memory:")) as conn:
        _run_script(conn, path)
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
                            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid").fetchall()
    return "\n\n".join(_clean_create(sql) for (sql,) in rows)


def build_db(root: str | Path, db_id: str, cache_dir: str | Path) -> Path:
    """Build `<cache_dir>/<db_id>.sqlite` from schema.sql (atomically); reuse it while schema.sql is unchanged."""
    src = schema_path(root, db_id)
    text = _read_schema(src)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    cache_dir = Path(cache_dir)
    db, stamp = cache_dir / f"{db_id}.sqlite", cache_dir / f"{db_id}.sqlite.sha256"
    if db.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return db
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{db_id}.sqlite.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        with closing(sqlite3.connect(tmp)) as conn:
            conn.execute("PRAGMA journal_mode = OFF")  # a scratch file: no journal, no fsync per INSERT
            conn.execute("PRAGMA synchronous = OFF")
            _run_script(conn, src)
            conn.commit()
        stamp.unlink(missing_ok=True)  # never leave an old stamp next to a new database
        os.replace(tmp, db)
    finally:
        tmp.unlink(missing_ok=True)
    write_atomic(stamp, digest + "\n")
    return db


def table_columns(db_path: str | Path) -> dict[str, frozenset[str]]:
    """Lower-cased table name -> lower-cased column names of a built database."""
    with closing(_connect_ro(db_path)) as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t.lower(): frozenset(row[1].lower() for row in conn.execute("SELECT * FROM pragma_table_info(?)", (t,)))
                for t in tables}


# ---------------------------------------------------------------- safe execution

_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
MAX_VALUE_BYTES = 10_000_000  # no string or blob a query builds may exceed this (SQLite's own limit is 1 GB)


def _connect_ro(db_path: str | Path) -> sqlite3.Connection:
    path = Path(db_path).resolve()
    if not path.is_file():  # mode=ro never creates a file, but say plainly what is missing
        raise sqlite3.OperationalError(f"database not found: {path}")
    return sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)


def _authorize(action: int, *_: object) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def execute(db_path: str | Path, sql: str, *, timeout_s: float = 2.0,
            row_cap: int = 10_000) -> tuple[Rows | None, str | None]:
    """Run one read-only query: (rows, None), or (None, error). Never writes, never runs past `timeout_s`.

    Layers: a read-only connection, `PRAGMA query_only`, an authorizer that allows only SELECT and reads
    (no ATTACH, PRAGMA, writes), a progress handler that aborts at the deadline ("timeout"), one statement
    only, and at most `row_cap` rows ("row cap exceeded").
    """
    deadline = time.monotonic() + timeout_s
    timed_out = False

    def past_deadline() -> bool:
        nonlocal timed_out
        timed_out = time.monotonic() > deadline
        return timed_out

    try:
        conn = _connect_ro(db_path)
    except sqlite3.Error as e:
        return None, str(e)
    try:
        conn.text_factory = lambda b: b.decode("utf-8", "replace")
        conn.execute("PRAGMA query_only = ON")
        if hasattr(conn, "setlimit"):  # Python >= 3.11
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.set_authorizer(_authorize)
        conn.set_progress_handler(past_deadline, 1000)
        rows = conn.execute(sql).fetchmany(row_cap + 1)
    except sqlite3.Error as e:
        return None, "timeout" if timed_out else (str(e) or type(e).__name__)
    finally:
        conn.close()
    if len(rows) > row_cap:
        return None, "row cap exceeded"
    return rows, None


def _value(v: object) -> object:
    if isinstance(v, float):
        return int(v) if v.is_integer() else round(v, 9)
    return v


def _same_result(pred: Rows, gold: Rows, ordered: bool) -> bool:
    p = [tuple(_value(v) for v in row) for row in pred]
    g = [tuple(_value(v) for v in row) for row in gold]
    return p == g if ordered else Counter(p) == Counter(g)


def _parse(sql: str) -> exp.Query | None:
    """sqlglot's tree of one SELECT (or set operation), or None when it is anything else or unparseable."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except (sqlglot.errors.SqlglotError, RecursionError):
        return None
    return tree if isinstance(tree, exp.Query) else None


def _ordered(gold: str) -> bool:
    tree = _parse(gold)
    return tree is not None and bool(tree.args.get("order"))


def _gold_rows(db_path: str | Path, gold: str, **limits) -> Rows:
    rows, err = execute(db_path, gold, **limits)
    if err is not None:
        raise UserError(f"gold query fails on {db_path} ({err}): {' '.join(gold.split())}")
    return rows


def execution_match(db_path: str | Path, pred: str, gold: str, **limits) -> bool:
    """Same result as gold: rows compared as multisets, as lists when gold has a top-level ORDER BY.

    A failing prediction is False; a failing gold query is a UserError. `limits` go to `execute`.
    """
    gold_rows = _gold_rows(db_path, gold, **limits)
    rows, err = execute(db_path, pred, **limits)
    return err is None and _same_result(rows, gold_rows, _ordered(gold))


# ---------------------------------------------------------------- exact set match (without values)

_VALUE = ("value",)
_FLIP = {exp.LT: exp.GT, exp.LTE: exp.GTE}
_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.Glob)
_SELECT_KEYS = {"expressions", "from", "from_", "joins", "where", "group", "having", "order", "limit", "offset",
                "distinct", "with", "with_"}
_SET_OPERATION = getattr(exp, "SetOperation", exp.Union)  # older sqlglot: Intersect and Except subclass Union


@dataclass
class _Scope:
    """The tables one SELECT can see: alias -> table name, its own table units, the enclosing scope."""
    aliases: dict[str, str] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    outputs: dict[str, exp.Expression] = field(default_factory=dict)  # SELECT aliases, for ORDER BY cnt
    schema: Mapping[str, frozenset[str]] | None = None
    outer: _Scope | None = None

    def table_of(self, qualifier: str) -> str:
        scope: _Scope | None = self
        while scope is not None:
            if qualifier in scope.aliases:
                return scope.aliases[qualifier]
            scope = scope.outer
        return qualifier

    def owner(self, column: str) -> str | None:
        """The table an unqualified column belongs to, when it is unambiguous."""
        scope: _Scope | None = self
        while scope is not None:
            hits = [t for t in scope.tables if scope.schema is not None and column in scope.schema.get(t, ())]
            if hits:
                return hits[0] if len(hits) == 1 else None
            if len(scope.tables) == 1 and (scope.schema is None or scope.tables[0] not in scope.schema):
                return scope.tables[0]
            scope = scope.outer
        return self.tables[0] if len(self.tables) == 1 else None

    def is_column(self, name: str) -> bool | None:
        """Whether `name` is a column of a visible table; None when some visible table is unknown."""
        scope: _Scope | None = self
        while scope is not None:
            if scope.schema is None or any(t not in scope.schema for t in scope.tables):
                return None
            if any(name in scope.schema[t] for t in scope.tables):
                return True
            scope = scope.outer
        return False


def _flat(node: exp.Expression, kind: type) -> list[exp.Expression]:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, kind):
        return _flat(node.this, kind) + _flat(node.expression, kind)
    return [node]


def _is_value(node: exp.Expression, scope: _Scope, rhs: bool) -> bool:
    if isinstance(node, exp.Neg):
        node = node.this
    if isinstance(node, exp.Literal):
        return True
    # SPIDER writes strings in double quotes, which SQLite reads as a string when no such column exists
    if isinstance(node, exp.Column) and not node.table and node.this.args.get("quoted"):
        known = scope.is_column(node.name.lower())
        return known is False or (known is None and rhs)
    return False


def _norm(node: object, scope: _Scope, rhs: bool = False) -> object:
    """A hashable form of an expression: lower-cased, aliases resolved, literal values replaced."""
    if isinstance(node, list):
        return tuple(_norm(n, scope) for n in node)
    if not isinstance(node, exp.Expression):
        return node.lower() if isinstance(node, str) else node
    if isinstance(node, (exp.Query, exp.Subquery)):
        return _query(node, scope)
    if isinstance(node, (exp.Paren, exp.Alias)):
        return _norm(node.this, scope, rhs)
    if _is_value(node, scope, rhs):
        return _VALUE
    if isinstance(node, exp.Column):
        name = node.name.lower()
        if node.table:
            return ("column", scope.table_of(node.table.lower()), name)
        if name in scope.outputs and not scope.is_column(name):  # ORDER BY an output alias
            return _norm(scope.outputs[name], replace(scope, outputs={}))
        return ("column", scope.owner(name), name)
    if isinstance(node, (exp.And, exp.Or)):
        return (node.key, frozenset(_norm(n, scope) for n in _flat(node, type(node))))
    if isinstance(node, _COMPARISONS):
        kind, left, right = type(node), node.this, node.expression
        if kind in _FLIP:
            kind, left, right = _FLIP[kind], right, left
        pair = (_norm(left, scope), _norm(right, scope, rhs=True))
        return (kind.key, frozenset(pair) if kind in (exp.EQ, exp.NEQ) else pair)
    if isinstance(node, exp.In) and node.expressions:
        return ("in", _norm(node.this, scope), frozenset(_norm(n, scope, rhs=True) for n in node.expressions))
    if isinstance(node, exp.Ordered):
        return (_norm(node.this, scope), bool(node.args.get("desc")))
    if isinstance(node, exp.Identifier):
        return node.name.lower()
    args = tuple(sorted((k, _norm(v, scope)) for k, v in node.args.items()
                        if v not in (None, False, []) and k != "nulls_first"))
    return (node.key, args) if args else node.key


def _arg(q: exp.Expression, name: str) -> object:
    """An argument that newer sqlglot spells with a trailing underscore (`from_`, `with_`)."""
    return q.args.get(f"{name}_") or q.args.get(name)


def _conjuncts(clause: exp.Expression | None, scope: _Scope) -> frozenset:
    return frozenset(_norm(n, scope) for n in _flat(clause.this, exp.And)) if clause else frozenset()


def _modifiers(q: exp.Expression, scope: _Scope) -> tuple:
    order = q.args.get("order")
    return (_norm(order.expressions, scope) if order else (), bool(q.args.get("limit")), bool(q.args.get("offset")))


def _query(q: exp.Expression, outer: _Scope) -> object:
    """The clause-by-clause signature of a query; set operations and subqueries recursively."""
    while isinstance(q, exp.Subquery):
        q = q.this
    if isinstance(q, _SET_OPERATION):
        return (q.key, bool(q.args.get("distinct")), _query(q.this, outer), _query(q.expression, outer),
                _modifiers(q, _Scope(schema=outer.schema, outer=outer)))
    if not isinstance(q, exp.Select):
        return _norm(q, outer)
    scope = _Scope(schema=outer.schema, outer=outer)
    ctes = _arg(q, "with")
    ctes_sig = frozenset((c.alias.lower(), _query(c.this, outer)) for c in ctes.expressions) if ctes else frozenset()
    units = [_arg(q, "from").this] if _arg(q, "from") else []
    units += [j.this for j in q.args.get("joins") or []]
    sigs = []
    for unit in units:
        if isinstance(unit, exp.Table):
            name = unit.name.lower()
            scope.aliases[unit.alias_or_name.lower()] = name
            sigs.append(name)
        else:  # a derived table: its columns lose their qualifier
            scope.aliases[unit.alias_or_name.lower()] = "(derived)"
            sigs.append(_query(unit, outer) if isinstance(unit, (exp.Query, exp.Subquery)) else _norm(unit, outer))
        scope.tables.append(scope.aliases[unit.alias_or_name.lower()])
    select = frozenset(_norm(e, scope) for e in q.expressions)
    scope.outputs = {e.alias.lower(): e.this for e in q.expressions if isinstance(e, exp.Alias)}
    group = q.args.get("group")
    group_sig = frozenset(_norm(group.expressions, scope)) if group else frozenset()
    rest = frozenset((k, _norm(v, scope)) for k, v in q.args.items() if k not in _SELECT_KEYS and v)
    return ("select", bool(q.args.get("distinct")), select, frozenset(Counter(sigs).items()),
            _conjuncts(q.args.get("where"), scope), group_sig, _conjuncts(q.args.get("having"), scope),
            _modifiers(q, scope), ctes_sig, rest)


def exact_set_match(pred: str, gold: str, *, schema: Mapping[str, frozenset[str]] | None = None) -> bool:
    """SPIDER's exact set match without values: same clauses, order-free where SQL is, literals ignored.

    `schema` (see `table_columns`) lets unqualified columns in joins resolve to their table; without it
    they only resolve when the FROM clause has a single table. Unparseable pred or gold: False.
    """
    p, g = _parse(pred), _parse(gold)
    if p is None or g is None:
        return False
    root = _Scope(schema=schema)
    return _query(p, root) == _query(g, root)


# ---------------------------------------------------------------- scoring

def score(db_path: str | Path, pred: str, gold: str, **limits) -> dict:
    """{"exec", "exact"} (0/1) and {"parse_error", "exec_error"} (bool) for one prediction."""
    gold_rows = _gold_rows(db_path, gold, **limits)
    rows, err = execute(db_path, pred, **limits)
    parse_error = _parse(pred) is None
    exact = not parse_error and exact_set_match(pred, gold, schema=table_columns(db_path))
    return {"exec": int(err is None and _same_result(rows, gold_rows, _ordered(gold))), "exact": int(exact),
            "parse_error": parse_error, "exec_error": err is not None}


def aggregate(scores: list[dict]) -> dict:
    """Mean rates over `score` results (all 0.0 for an empty list) and n."""
    n = len(scores)

    def rate(key: str) -> float:
        return sum(float(s[key]) for s in scores) / n if n else 0.0

    return {"execution_accuracy": rate("exec"), "exact_set_match": rate("exact"),
            "parse_error_rate": rate("parse_error"), "exec_error_rate": rate("exec_error"), "n": n}
