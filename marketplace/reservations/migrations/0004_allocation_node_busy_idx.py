"""An index for "is this node busy in [start, end)?", one node at a time.

The booking's first-fit walk probes node after node; on PostgreSQL this covers the probe
(index-only scan over the node's live allocations that end after start). SQLite has no INCLUDE
columns, so it gets the same index without them.
"""

from django.db import migrations

INDEX = "allocation_node_busy_idx"


def create(apps, schema_editor):
    include = " INCLUDE (starts_at)" if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {INDEX} ON reservations_allocation (node_id, blocked_until){include} "
        "WHERE NOT (state = 'cancelled')"
    )


def drop(apps, schema_editor):
    schema_editor.execute(f"DROP INDEX IF EXISTS {INDEX}")


class Migration(migrations.Migration):
    dependencies = [("reservations", "0003_reservation_tenant_holding_idx")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
