"""The admin never offers a delete that would lose a business record, and audits what it changes."""

import pytest
from django.contrib import admin
from django.test import RequestFactory

from marketplace.core.models import AuditLog
from tests.factories import NodeFactory, UserFactory


def business_admins():
    # Every model of the project's own apps is a business record (inventory, tenants, bookings, audit…).
    return [
        (model, model_admin) for model, model_admin in admin.site._registry.items()
        if model.__module__.startswith("marketplace.")
    ]


def test_business_models_are_registered():
    labels = {model._meta.label_lower for model, _ in business_admins()}
    assert {"core.auditlog", "tenants.tenant", "inventory.node"} <= labels


@pytest.mark.django_db
@pytest.mark.parametrize("model,model_admin", business_admins(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_no_registered_admin_deletes_business_records(model, model_admin):
    # given a superuser in the admin
    request = RequestFactory().get("/admin/")
    request.user = UserFactory(is_staff=True, is_superuser=True)
    # then neither the object page nor the bulk action offers delete, nor does any inline
    assert model_admin.has_delete_permission(request) is False
    assert "delete_selected" not in model_admin.get_actions(request)
    for inline in model_admin.get_inline_instances(request):
        # Django lets an inline delete only when both allow it.
        deletes = inline.can_delete and inline.has_delete_permission(request)
        assert not deletes, f"{type(inline).__name__} of {model.__name__} can delete rows"


@pytest.mark.django_db
def test_admin_change_writes_an_audit_row(client):
    # given ops editing a node in the admin
    ops = UserFactory(is_staff=True, is_superuser=True)
    node = NodeFactory(topology_domain="ib-0")
    client.force_login(ops)
    page = client.get(f"/admin/inventory/node/{node.pk}/change/")
    form = page.context["adminform"].form
    data = {name: form[name].value() if form[name].value() is not None else "" for name in form.fields}
    data.update({"topology_domain": "ib-7", "maintenance_windows-TOTAL_FORMS": "0",
                 "maintenance_windows-INITIAL_FORMS": "0"})
    data = {key: value for key, value in data.items() if value is not None}
    # when the change is saved
    response = client.post(f"/admin/inventory/node/{node.pk}/change/", data)
    # then it is saved and audited with before and after
    assert response.status_code == 302, response.content[:2000]
    row = AuditLog.objects.get(action="node.admin_update", object_id=str(node.pk))
    assert row.before["topology_domain"] == "ib-0" and row.after["topology_domain"] == "ib-7"
    assert row.actor == f"user:{ops.username}"


@pytest.mark.django_db
def test_admin_cannot_delete_a_user_and_audits_changes_without_the_password(client):
    # given ops in the admin, and a user who is a member of a tenant
    from marketplace.tenants.models import Membership
    from tests.factories import MembershipFactory

    ops = UserFactory(is_staff=True, is_superuser=True)
    member = MembershipFactory().user
    client.force_login(ops)
    # then there is no delete, on the page or in bulk, and the membership stays
    assert client.get(f"/admin/auth/user/{member.pk}/delete/").status_code == 403
    client.post(f"/admin/auth/user/{member.pk}/delete/", {"post": "yes"})
    client.post("/admin/auth/user/", {"action": "delete_selected", "_selected_action": [member.pk], "post": "yes"})
    assert Membership.objects.filter(user=member).exists()
    # when they deactivate the user (and set a password) there, the change is audited, with no
    # password hash in the row
    request = RequestFactory().post("/admin/")
    request.user = ops
    member.is_active = False
    member.set_password("a new secret 123")
    admin.site._registry[type(member)].save_model(request, member, form=None, change=True)
    row = AuditLog.objects.get(action="user.admin_update", object_id=str(member.pk))
    assert row.before["is_active"] is True and row.after["is_active"] is False
    assert "password" not in row.before and "password" not in row.after


@pytest.mark.django_db
def test_admin_cannot_undo_a_token_revocation_and_never_audits_its_hash(client):
    # given a revoked token, and ops in the admin
    from django.utils import timezone

    from marketplace.tenants.models import ApiToken
    from tests.factories import MembershipFactory

    membership = MembershipFactory()
    token = ApiToken.objects.create(user=membership.user, tenant=membership.tenant, name="ci", prefix="gpm_abc",
                                    key_hash="f" * 64, revoked_at=timezone.now())
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    # then the change form offers nothing to edit, so the revocation cannot be cleared
    page = client.get(f"/admin/tenants/apitoken/{token.pk}/change/")
    assert "revoked_at" not in page.context["adminform"].form.fields
    client.post(f"/admin/tenants/apitoken/{token.pk}/change/", {"revoked_at_0": "", "revoked_at_1": ""})
    token.refresh_from_db()
    assert token.revoked_at is not None
    # and a save through the admin writes no hash into the tenant's audit log
    request = RequestFactory().post("/admin/")
    request.user = UserFactory(is_staff=True)
    token.name = "renamed"
    admin.site._registry[ApiToken].save_model(request, token, form=None, change=True)
    row = AuditLog.objects.get(action="apitoken.admin_update", object_id=str(token.pk))
    assert "key_hash" not in row.before and "key_hash" not in row.after and "f" * 64 not in str(row.after)


@pytest.mark.django_db
def test_admin_revokes_a_users_token_with_an_action_and_audits_it(client):
    # given a live token of a tenant user (leaked, say), and ops in the admin
    from marketplace.tenants.models import ApiToken
    from tests.factories import MembershipFactory

    membership = MembershipFactory()
    token = ApiToken.objects.create(user=membership.user, tenant=membership.tenant, name="ci", prefix="gpm_abc",
                                    key_hash="e" * 64)
    ops = UserFactory(is_staff=True, is_superuser=True)
    client.force_login(ops)
    # when they revoke it with the admin action
    client.post("/admin/tenants/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    # then it is revoked, and the tenant's audit log says who did it
    assert "1 token(s) revoked." in client.get("/admin/tenants/apitoken/").content.decode()
    token.refresh_from_db()
    assert token.revoked_at is not None
    row = AuditLog.objects.get(action="api_token.revoke", object_id=str(token.pk))
    assert row.actor == f"user:{ops.username}" and row.tenant_id == membership.tenant_id


@pytest.mark.django_db
def test_admin_cannot_rename_a_node_or_move_it_to_another_cluster(client):
    # given ops editing a booked node in the admin, and another cluster
    from tests.factories import AllocationFactory, ClusterFactory

    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    node, other = AllocationFactory().node, ClusterFactory()
    page = client.get(f"/admin/inventory/node/{node.pk}/change/")
    assert not {"name", "cluster", "gpu_model"} & set(page.context["adminform"].form.fields)
    # when a change that renames and moves it is posted anyway
    data = {"name": "renamed", "cluster": other.pk, "gpu_count": node.gpu_count, "cpu_cores": node.cpu_cores,
            "memory_gb": node.memory_gb, "topology_domain": "ib-7", "maintenance_windows-TOTAL_FORMS": "0",
            "maintenance_windows-INITIAL_FORMS": "0"}
    response = client.post(f"/admin/inventory/node/{node.pk}/change/", data)
    # then the hardware fact is saved and the name and cluster are not
    assert response.status_code == 302, response.content[:2000]
    node.refresh_from_db()
    assert node.name != "renamed" and node.cluster_id != other.pk and node.topology_domain == "ib-7"


@pytest.mark.django_db
def test_admin_status_action_refuses_booked_nodes(client):
    # given ops in the admin, a free node and a booked one
    from marketplace.inventory.models import Node
    from tests.factories import AllocationFactory

    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    free, booked = NodeFactory(), AllocationFactory().node
    # when they put both into maintenance with the admin action
    response = client.post("/admin/inventory/node/", {"action": "set_maintenance",
                                                      "_selected_action": [free.pk, booked.pk]}, follow=True)
    # then nothing changes and the booked node is named
    assert booked.name in response.content.decode()
    assert set(Node.objects.values_list("status", flat=True)) == {"available"}


@pytest.mark.django_db
def test_staff_who_may_only_view_tokens_cannot_revoke_them(client):
    from django.contrib.auth.models import Permission

    from marketplace.tenants.models import ApiToken
    from tests.factories import MembershipFactory

    membership = MembershipFactory()
    token = ApiToken.objects.create(user=membership.user, tenant=membership.tenant, name="ci", prefix="gpm_abd",
                                    key_hash="d" * 64)
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_apitoken"))
    client.force_login(viewer)
    client.post("/admin/tenants/apitoken/", {"action": "revoke", "_selected_action": [token.pk]})
    token.refresh_from_db()
    assert token.revoked_at is None
