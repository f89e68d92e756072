"""Fewer indexes written per booking.

A booking writes one reservation, an allocation per node, three due events and two audit rows, and
every index on those tables costs each of them an insert. Gone: the foreign-key indexes that a
composite index already leads with (reservation tenant, allocation reservation and node, event
reservation, audit tenant), allocation_node_period_idx, and the covering GiST index of 0002, whose
INCLUDE columns the exclusion constraint's own GiST index now carries. allocation_node_busy_idx
covers every node's allocations (state among its columns) so that it also serves the node foreign key.
"""


import django.contrib.postgres.constraints
import django.contrib.postgres.fields.ranges
import django.db.models.deletion
import marketplace.core.db
from django.db import migrations, models

PERIOD_COVER = "allocation_period_cover_idx"
NODE_BUSY = "allocation_node_busy_idx"


def drop_period_cover_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {PERIOD_COVER}")


def create_period_cover_index(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {PERIOD_COVER} ON reservations_allocation USING gist "
            "(tstzrange(starts_at, blocked_until, '[)')) INCLUDE (node_id, starts_at, blocked_until) "
            "WHERE NOT (state = 'cancelled')"
        )


def create_node_busy_index(apps, schema_editor):
    include = " INCLUDE (starts_at, state)" if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"DROP INDEX IF EXISTS {NODE_BUSY}")
    schema_editor.execute(f"CREATE INDEX {NODE_BUSY} ON reservations_allocation (node_id, blocked_until){include}")


def create_partial_node_busy_index(apps, schema_editor):
    include = " INCLUDE (starts_at)" if schema_editor.connection.vendor == "postgresql" else ""
    schema_editor.execute(f"DROP INDEX IF EXISTS {NODE_BUSY}")
    schema_editor.execute(f"CREATE INDEX {NODE_BUSY} ON reservations_allocation (node_id, blocked_until){include} "
                          "WHERE NOT (state = 'cancelled')")


class Migration(migrations.Migration):

    dependencies = [
        ('inventory', '0001_initial'),
        ('reservations', '0004_allocation_node_busy_idx'),
        ('tenants', '0001_initial'),
    ]

    operations = [
        marketplace.core.db.PostgresOnlyRemoveConstraint(
            model_name='allocation',
            name='allocation_no_double_booking',
        ),
        migrations.RunPython(drop_period_cover_index, create_period_cover_index, elidable=False),
        migrations.RunPython(create_node_busy_index, create_partial_node_busy_index, elidable=False),
        migrations.RemoveIndex(
            model_name='allocation',
            name='allocation_node_period_idx',
        ),
        migrations.AlterField(
            model_name='allocation',
            name='node',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='allocations', to='inventory.node'),
        ),
        migrations.AlterField(
            model_name='allocation',
            name='reservation',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='allocations', to='reservations.reservation'),
        ),
        migrations.AlterField(
            model_name='reservation',
            name='tenant',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='reservations', to='tenants.tenant'),
        ),
        migrations.AlterField(
            model_name='reservationevent',
            name='reservation',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='events', to='reservations.reservation'),
        ),
        marketplace.core.db.PostgresOnlyAddConstraint(
            model_name='allocation',
            constraint=django.contrib.postgres.constraints.ExclusionConstraint(condition=models.Q(('state', 'cancelled'), _negated=True), expressions=[(marketplace.core.db.TsTzRange('starts_at', 'blocked_until', django.contrib.postgres.fields.ranges.RangeBoundary()), '&&'), ('node', '=')], include=('starts_at', 'blocked_until'), name='allocation_no_double_booking', violation_error_code='node_double_booked', violation_error_message='This node is already allocated for an overlapping period.'),
        ),
    ]
