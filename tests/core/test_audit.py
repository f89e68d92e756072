"""Every change made through a service leaves an audit row with who, what, when, before and after."""

import pytest

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.inventory import services as inventory
from marketplace.tenants import services as tenants
from tests.factories import MembershipFactory, NodeFactory, UserFactory


@pytest.mark.django_db
class TestAuditLog:
    def test_person_change_records_who_what_when_before_after(self, tenant):
        # given ops changing a tenant's quota
        ops = UserFactory(is_staff=True)
        # when the change is made
        tenants.tenant_update(actor=Actor.for_user(ops), tenant=tenant, gpu_quota=12)
        # then one row says who, what, when, and the values before and after
        row = AuditLog.objects.get(action="tenant.update")
        assert (row.actor, row.actor_user, row.tenant) == (f"user:{ops.username}", ops, tenant)
        assert (row.object_type, row.object_id) == ("tenants.tenant", str(tenant.pk))
        assert row.before["gpu_quota"] == 1024 and row.after["gpu_quota"] == 12
        assert row.at is not None

    def test_task_change_is_recorded_with_the_task_as_actor(self):
        node = NodeFactory()
        inventory.node_set_status(actor=Actor.task("scheduler.health"), node=node, status="offline", reason="NotReady")
        row = AuditLog.objects.get(action="node.status")
        assert row.actor == "task:scheduler.health" and row.actor_user is None
        assert (row.before, row.after, row.message) == ({"status": "available"}, {"status": "offline"}, "NotReady")

    def test_a_change_to_the_same_value_writes_nothing(self, tenant):
        tenants.tenant_update(actor=Actor("system"), tenant=tenant, gpu_quota=tenant.gpu_quota)
        assert not AuditLog.objects.filter(action="tenant.update").exists()

    def test_token_issue_and_revoke_are_audited_without_the_secret(self, tenant):
        user = MembershipFactory(tenant=tenant).user
        issued = tenants.api_token_issue(actor=Actor.for_user(user), user=user, tenant=tenant, name="ci")
        tenants.api_token_revoke(actor=Actor.for_user(user), token_id=issued.token.pk, tenant=tenant)
        rows = AuditLog.objects.filter(object_type="tenants.apitoken").order_by("id")
        assert [row.action for row in rows] == ["api_token.issue", "api_token.revoke"]
        assert all(issued.raw not in str(row.before) + str(row.after) for row in rows)

    def test_failed_change_leaves_no_audit_row(self, tenant):
        with pytest.raises(Exception):
            tenants.tenant_update(actor=Actor("system"), tenant=tenant, gpu_quota=-5)
        assert not AuditLog.objects.exists()
        tenant.refresh_from_db()
        assert tenant.gpu_quota == 1024
