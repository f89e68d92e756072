"""A covering GiST index for the free-node search (PostgreSQL only).

The availability search asks "which nodes have a live allocation overlapping this window" for the
whole fleet. The exclusion constraint's GiST index answers the overlap but needs a heap fetch per
row (~24,000 per search at 25,000 nodes); this index carries node_id and the period columns, so
the same question is an index-only scan feeding a hash anti-join.
"""

from django.db import migrations

INDEX = "allocation_period_cover_idx"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {INDEX} ON reservations_allocation USING gist "
            "(tstzrange(starts_at, blocked_until, '[)')) INCLUDE (node_id, starts_at, blocked_until) "
            "WHERE NOT (state = 'cancelled')"
        )


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("reservations", "0001_initial")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
