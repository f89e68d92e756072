"""Server-rendered pages: login, dashboard, tenant account pages, ops pages. CSRF is enforced."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.inventory.models import MaintenanceWindow, Node
from marketplace.tenants import services
from marketplace.tenants.models import ApiToken, Membership
from tests.factories import AllocationFactory, MembershipFactory, NodeFactory, TenantFactory, UserFactory

OPS_PAGES = ["/ops/fleet/", "/ops/inventory/", "/ops/audit/", "/ops/scheduler/"]


@pytest.fixture
def member_client(client, member):
    client.force_login(member)
    return client


@pytest.fixture
def ops_client(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.mark.django_db
class TestLoginAndDashboard:
    def test_anonymous_is_sent_to_login(self, client):
        response = client.get("/")
        assert response.status_code == 302 and response["Location"].startswith("/login/")

    def test_login_page_renders_with_csrf_token(self, client):
        response = client.get("/login/")
        assert response.status_code == 200
        assert b"csrfmiddlewaretoken" in response.content

    def test_login_without_csrf_token_is_refused(self, member):
        strict = Client(enforce_csrf_checks=True)
        response = strict.post("/login/", {"username": member.username, "password": "correct-horse-battery"})
        assert response.status_code == 403

    @pytest.mark.parametrize("path", ["/account/tokens/", "/tenant/switch/", "/ops/inventory/"])
    def test_signed_in_posts_without_csrf_token_are_refused(self, staff_user, tenant, path):
        MembershipFactory(user=staff_user, tenant=tenant, role="owner")
        strict = Client(enforce_csrf_checks=True)
        strict.force_login(staff_user)
        assert strict.post(path, {"name": "x", "tenant": tenant.pk}).status_code == 403
        assert not ApiToken.objects.exists()

    @pytest.mark.parametrize(("path", "query"), [
        ("/ops/audit/", {"action": "reservation.create\x00"}), ("/ops/inventory/", {"cluster": "\x00"}),
        ("/admin/reservations/reservation/", {"q": "a\x00"})])
    def test_a_nul_character_in_the_query_string_is_a_400(self, ops_client, path, query):
        # PostgreSQL refuses NUL even in a comparison; these pages filter on raw query values.
        response = ops_client.get(path, query)
        assert response.status_code == 400
        assert "NUL" in response.content.decode()

    def test_member_signs_in_and_sees_their_tenant(self, client, member, tenant):
        response = client.post("/login/", {"username": member.username, "password": "correct-horse-battery"},
                               follow=True)
        assert response.status_code == 200
        assert tenant.name in response.content.decode()

    def test_staff_dashboard_shows_the_fleet_by_model(self, ops_client):
        NodeFactory.create_batch(2)
        page = ops_client.get("/").content.decode()
        assert "Fleet now, by GPU model" in page and "H100-SXM-80GB" in page


@pytest.mark.django_db
class TestTenantSwitcher:
    def test_user_in_two_tenants_switches(self, client):
        user = UserFactory()
        first, second = MembershipFactory(user=user).tenant, MembershipFactory(user=user).tenant
        client.force_login(user)
        assert f'value="{second.pk}"' in client.get("/").content.decode()
        response = client.post("/tenant/switch/", {"tenant": second.pk}, follow=True)
        assert f"{user.username} · {second.slug}" in response.content.decode()
        tokens = client.post("/account/tokens/", {"name": "switched"})
        assert tokens.status_code == 200
        assert ApiToken.objects.get(name="switched").tenant == second
        assert first != second

    @pytest.mark.parametrize(("next_url", "lands_on"), [
        ("/reservations/", "/reservations/"), ("-399", "/"), ("web:ops-fleet", "/"),
        ("https://elsewhere.example/", "/"), ("//elsewhere.example/", "/"), ("", "/")])
    def test_switching_returns_only_to_a_page_of_this_site(self, member_client, tenant, next_url, lands_on):
        response = member_client.post("/tenant/switch/", {"tenant": tenant.pk, "next": next_url})
        assert response.status_code == 302
        assert response["Location"] == lands_on

    @pytest.mark.parametrize("tenant_id", ["99999999999999999999999", "-1", "٣", ""])
    def test_switching_to_an_id_no_tenant_can_have_says_so(self, member_client, tenant_id):
        response = member_client.post("/tenant/switch/", {"tenant": tenant_id}, follow=True)
        assert response.status_code == 200 and "You are not a member of that tenant." in response.content.decode()

    def test_a_tenant_that_adds_someone_later_does_not_become_their_default(self, client):
        # given a user of tenant "zeta", whom the owner of tenant "alpha" then adds to theirs
        user = UserFactory()
        MembershipFactory(user=user, tenant=TenantFactory(slug="zeta"))
        alpha = TenantFactory(slug="alpha")
        alpha_owner = MembershipFactory(tenant=alpha, role="owner").user
        services.membership_create(actor=Actor.for_user(alpha_owner), by=alpha_owner, tenant=alpha,
                                   username=user.username, role="member")
        # when they sign in and have not picked a tenant, they act for the tenant they were in first
        client.force_login(user)
        page = client.get("/").content.decode()
        assert f"{user.username} · zeta" in page

    def test_cannot_switch_to_a_tenant_one_is_not_in(self, member_client, tenant):
        stranger_tenant = TenantFactory()
        response = member_client.post("/tenant/switch/", {"tenant": stranger_tenant.pk}, follow=True)
        assert "not a member of that tenant" in response.content.decode()
        assert member_client.get("/").context["current_tenant"] == tenant


@pytest.mark.django_db
class TestTokenPages:
    def test_create_shows_the_secret_once_then_revoke(self, member_client, member, tenant):
        # when a member creates a token
        created = member_client.post("/account/tokens/", {"name": "laptop"})
        issued = created.context["issued"]
        # then the page shows the secret, and the next visit does not
        assert issued.raw in created.content.decode()
        assert issued.raw not in member_client.get("/account/tokens/").content.decode()
        # when they revoke it
        member_client.post(f"/account/tokens/{issued.token.pk}/revoke/")
        issued.token.refresh_from_db()
        assert issued.token.revoked_at is not None
        assert AuditLog.objects.filter(action="api_token.revoke", object_id=str(issued.token.pk)).exists()

    def test_bad_token_form_is_400_and_creates_nothing(self, member_client):
        response = member_client.post("/account/tokens/", {"name": ""})
        assert response.status_code == 400
        response = member_client.post("/account/tokens/",
                                      {"name": "old", "expires_at": "2001-01-01 00:00"})
        assert response.status_code == 400 and "future" in response.content.decode()
        assert not ApiToken.objects.exists()

    def test_cannot_revoke_another_users_token(self, member_client, tenant):
        colleague = MembershipFactory(tenant=tenant).user
        theirs = services.api_token_issue(actor=Actor.for_user(colleague), user=colleague, tenant=tenant, name="x")
        member_client.post(f"/account/tokens/{theirs.token.pk}/revoke/")
        theirs.token.refresh_from_db()
        assert theirs.token.revoked_at is None

    def test_a_viewer_cannot_revoke_a_token_here_as_in_the_api(self, client, tenant):
        # given a viewer with a token of their own (issued when they could still write, say)
        viewer = MembershipFactory(tenant=tenant, role="viewer").user
        mine = services.api_token_issue(actor=Actor.for_user(viewer), user=viewer, tenant=tenant, name="ci").token
        client.force_login(viewer)
        # then the page offers no Revoke button, and a revoke posted anyway is refused
        assert "Revoke" not in client.get("/account/tokens/").content.decode()
        assert client.post(f"/account/tokens/{mine.pk}/revoke/").status_code == 403
        mine.refresh_from_db()
        assert mine.revoked_at is None

    def test_viewer_sees_no_create_form(self, client, tenant):
        viewer = MembershipFactory(tenant=tenant, role="viewer").user
        client.force_login(viewer)
        assert "Create a token" not in client.get("/account/tokens/").content.decode()
        assert client.post("/account/tokens/", {"name": "sneaky"}).status_code == 403
        assert not ApiToken.objects.exists()


@pytest.mark.django_db
class TestMemberPages:
    def test_owner_adds_a_member_and_changes_a_role(self, client, tenant):
        owner = MembershipFactory(tenant=tenant, role="owner").user
        newcomer = UserFactory()
        client.force_login(owner)
        client.post("/account/members/", {"username": newcomer.username, "role": "viewer"})
        membership = Membership.objects.get(user=newcomer, tenant=tenant)
        client.post(f"/account/members/{membership.pk}/role/", {"role": "member"})
        membership.refresh_from_db()
        assert membership.role == "member"

    def test_adding_a_member_twice_is_400_with_the_reason_and_the_input_kept(self, client, tenant):
        owner = MembershipFactory(tenant=tenant, role="owner").user
        existing = MembershipFactory(tenant=tenant, role="member").user
        client.force_login(owner)
        response = client.post("/account/members/", {"username": existing.username, "role": "viewer"})
        page = response.content.decode()
        assert response.status_code == 400 and "already a member of this tenant" in page
        assert f'value="{existing.username}"' in page
        assert Membership.objects.get(user=existing, tenant=tenant).role == "member"

    def test_member_cannot_add(self, member_client, tenant):
        newcomer = UserFactory()
        response = member_client.post("/account/members/", {"username": newcomer.username, "role": "owner"})
        assert response.status_code == 400
        assert not Membership.objects.filter(user=newcomer).exists()

    def test_members_page_lists_only_my_tenant(self, member_client, member):
        outsider = MembershipFactory(tenant=TenantFactory()).user
        page = member_client.get("/account/members/").content.decode()
        assert member.username in page and outsider.username not in page


@pytest.mark.django_db
class TestOpsPages:
    @pytest.mark.parametrize("path", OPS_PAGES)
    def test_tenants_get_403(self, member_client, path):
        assert member_client.get(path).status_code == 403

    @pytest.mark.parametrize("path", OPS_PAGES)
    def test_anonymous_is_sent_to_login(self, client, path):
        assert client.get(path)["Location"].startswith("/login/")

    def test_fleet_page_shows_allocated_idle_and_maintenance_by_cluster(self, ops_client):
        AllocationFactory(reservation__starts_at=timezone.now() - timedelta(hours=1))
        node = NodeFactory()
        NodeFactory(status=Node.Status.MAINTENANCE, cluster=node.cluster)
        response = ops_client.get("/ops/fleet/")
        groups = dict(response.context["groups"])
        row = next(r for r in groups["Cluster"] if r.key == node.cluster.name)
        assert row.by_state == {"idle": 8, "maintenance": 8}
        model_row = groups["GPU model"][0]
        assert model_row.by_state == {"allocated": 8, "idle": 8, "maintenance": 8}
        assert model_row.allocated_percent == 50

    def test_fleet_page_counts_a_node_inside_a_maintenance_window_as_maintenance(self, ops_client):
        # given two available nodes, one inside a maintenance window now and one with a window later
        inside, later = NodeFactory(), NodeFactory()
        MaintenanceWindow.objects.create(node=inside, starts_at=timezone.now() - timedelta(minutes=1),
                                         ends_at=timezone.now() + timedelta(hours=2))
        MaintenanceWindow.objects.create(node=later, starts_at=timezone.now() + timedelta(days=1),
                                         ends_at=timezone.now() + timedelta(days=1, hours=2))
        # when the fleet page counts them, then the first is in maintenance, not idle
        groups = dict(ops_client.get("/ops/fleet/").context["groups"])
        assert groups["GPU model"][0].by_state == {"idle": 8, "maintenance": 8}

    def test_inventory_plans_and_cancels_maintenance(self, ops_client):
        node = NodeFactory()
        start = timezone.now() + timedelta(days=1)
        ops_client.post("/ops/inventory/", {"node": node.pk, "starts_at": start.strftime("%Y-%m-%d %H:%M"),
                                            "ends_at": (start + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M"),
                                            "reason": "cabling"})
        window = MaintenanceWindow.objects.get()
        assert "cabling" in ops_client.get("/ops/inventory/").content.decode()
        ops_client.post(f"/ops/maintenance/{window.pk}/cancel/")
        window.refresh_from_db()
        assert window.cancelled_at is not None

    def test_bad_window_is_400_with_message(self, ops_client):
        node = NodeFactory()
        response = ops_client.post("/ops/inventory/", {"node": node.pk, "starts_at": "2030-01-02 10:00",
                                                       "ends_at": "2030-01-02 09:00"})
        assert response.status_code == 400 and "must end after it starts" in response.content.decode()
        assert not MaintenanceWindow.objects.exists()

    def test_bulk_status_reports_booked_nodes(self, ops_client):
        allocation = AllocationFactory()
        response = ops_client.post("/ops/inventory/node-status/",
                                   {"nodes": [allocation.node_id], "status": "maintenance"}, follow=True)
        assert allocation.node.name in response.content.decode()
        assert Node.objects.get(pk=allocation.node_id).status == "available"
        ops_client.post("/ops/inventory/node-status/",
                        {"nodes": [allocation.node_id], "status": "maintenance", "force": "on"})
        assert Node.objects.get(pk=allocation.node_id).status == "maintenance"

    @pytest.mark.parametrize("node_id", ["99999999999999999999999", "-1", "1e3"])
    def test_a_node_id_no_row_can_have_is_refused_not_a_database_error(self, ops_client, node_id):
        node = NodeFactory()
        response = ops_client.post("/ops/inventory/node-status/", {"nodes": [node.pk, node_id], "status": "retired"},
                                   follow=True)
        assert response.status_code == 200 and "Choose nodes and a status." in response.content.decode()
        start = timezone.now() + timedelta(days=1)
        response = ops_client.post("/ops/inventory/", {"node": node_id, "starts_at": start.strftime("%Y-%m-%d %H:%M"),
                                                       "ends_at": (start + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M")})
        assert response.status_code == 400
        assert Node.objects.get(pk=node.pk).status == "available" and not MaintenanceWindow.objects.exists()

    def test_a_status_change_with_a_too_long_reason_says_so(self, ops_client):
        node = NodeFactory()
        response = ops_client.post("/ops/inventory/node-status/",
                                   {"nodes": [node.pk], "status": "retired", "reason": "x" * 501}, follow=True)
        page = response.content.decode()
        assert "reason: Ensure this value has at most 500 characters" in page and "Choose nodes" not in page
        assert Node.objects.get(pk=node.pk).status == "available"

    def test_inventory_page_is_a_fixed_number_of_queries(self, ops_client, django_assert_max_num_queries):
        NodeFactory.create_batch(30)
        with django_assert_max_num_queries(16):
            assert ops_client.get("/ops/inventory/").status_code == 200

    def test_audit_page_filters(self, ops_client, tenant):
        services.tenant_update(actor=Actor("system"), tenant=tenant, gpu_quota=3)
        page = ops_client.get("/ops/audit/", {"action": "tenant."}).content.decode()
        assert "tenant.update" in page and tenant.slug in page
