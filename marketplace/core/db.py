"""Database helpers shared by the apps: PostgreSQL-only operations and range expressions."""

import functools
import re
import time
from typing import Any

import psycopg
from django.contrib.postgres.fields import DateTimeRangeField
from django.db import connection, models
from django.db.migrations.operations import AddConstraint, RemoveConstraint


class TsTzRange(models.Func):
    """``tstzrange(lower, upper, '[)')``: a half-open period built from two timestamp columns."""

    function = "TSTZRANGE"
    output_field = DateTimeRangeField()


class _PostgresOnly:
    """A migration operation that changes the schema on PostgreSQL only (the state everywhere)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)


class PostgresOnlyAddConstraint(_PostgresOnly, AddConstraint):
    """Adds a constraint that only PostgreSQL can express (exclusion over ranges).

    On SQLite, write transactions are serialised instead (transaction_mode IMMEDIATE), so the
    booking service's own overlap check runs alone.
    """


class PostgresOnlyRemoveConstraint(_PostgresOnly, RemoveConstraint):
    """Removes a constraint that PostgresOnlyAddConstraint added (nothing to do elsewhere)."""


_NAMED_PARAMETER = re.compile(r"%\((\w+)\)s|%%")


@functools.lru_cache(maxsize=64)
def _native_placeholders(sql: str) -> tuple[bytes, tuple[str, ...]]:
    """``sql`` with its %(name)s placeholders as PostgreSQL's own $1, $2, ..., and the names in that order.

    psycopg finds a statement's placeholders with a regular expression on every execution once the
    statement is longer than 4 kB (its cache stops there); converted once here, the statement runs
    on a RawCursor, which sends it as it is.
    """
    names: list[str] = []

    def native(match: re.Match) -> str:
        if match.group(0) == "%%":
            return "%"
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    # Bytes, the same object each time: psycopg sends it as is and keys its prepared statements on it.
    return _NAMED_PARAMETER.sub(native, sql).encode(), tuple(names)


def fetch_prepared(sql: str, params: dict[str, Any]) -> list[tuple]:
    """Rows of one statement, run as a prepared statement on Django's PostgreSQL connection.

    For hot statements whose planning costs more than their execution: the first run on a
    connection prepares the statement, later runs only bind and execute it. ``sql`` has %(name)s
    placeholders (and %% for a literal %). Runs in the caller's transaction; database errors come
    out as Django's (IntegrityError, OperationalError, ...), and the statement goes through
    connection.execute_wrapper() hooks and the query log like any other.
    Unprepared when the connection's ``prepare_threshold`` is None (DB_PREPARED_STATEMENTS off).
    """
    connection.ensure_connection()

    def execute(sql: str, params: dict[str, Any], many: bool, context: dict) -> list[tuple]:
        native_sql, names = _native_placeholders(sql)
        with connection.wrap_database_errors:
            # Django's own cursor class binds on the client, which cannot prepare; this one binds on the server.
            with psycopg.RawCursor(connection.connection) as cursor:
                cursor.execute(native_sql, [params[name] for name in names], prepare=True)
                return cursor.fetchall()

    executor = execute
    for wrapper in reversed(connection.execute_wrappers):
        executor = functools.partial(wrapper, executor)
    started = time.monotonic()
    try:
        return executor(sql, params, False, {"connection": connection, "cursor": None})
    finally:
        if connection.queries_logged:
            connection.queries_log.append({"sql": sql, "time": f"{time.monotonic() - started:.3f}"})
