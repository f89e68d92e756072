"""Database helpers shared by the apps: PostgreSQL-only operations and range expressions."""

import functools
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


def fetch_prepared(sql: str, params: dict[str, Any]) -> list[tuple]:
    """Rows of one statement, run as a prepared statement on Django's PostgreSQL connection.

    For hot statements whose planning costs more than their execution: the first run on a
    connection prepares the statement, later runs only bind and execute it. Runs in the caller's
    transaction; database errors come out as Django's (IntegrityError, OperationalError, ...), and
    the statement goes through connection.execute_wrapper() hooks and the query log like any other.
    Unprepared when the connection's ``prepare_threshold`` is None (DB_PREPARED_STATEMENTS off).
    """
    connection.ensure_connection()

    def execute(sql: str, params: dict[str, Any], many: bool, context: dict) -> list[tuple]:
        with connection.wrap_database_errors:
            # Django's own cursor class binds on the client, which cannot prepare; this one binds on the server.
            with psycopg.Cursor(connection.connection) as cursor:
                cursor.execute(sql, params, prepare=True)
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
