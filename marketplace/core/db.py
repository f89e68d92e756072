"""Database helpers shared by the apps: PostgreSQL-only operations and range expressions."""

from django.contrib.postgres.fields import DateTimeRangeField
from django.db import models
from django.db.migrations.operations import AddConstraint


class TsTzRange(models.Func):
    """``tstzrange(lower, upper, '[)')``: a half-open period built from two timestamp columns."""

    function = "TSTZRANGE"
    output_field = DateTimeRangeField()


class PostgresOnlyAddConstraint(AddConstraint):
    """Adds a constraint that only PostgreSQL can express (exclusion over ranges).

    On SQLite, write transactions are serialised instead (transaction_mode IMMEDIATE), so the
    booking service's own overlap check runs alone.
    """

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
