"""The caller's tenant, its members, and the staff API for tenants."""

import pytest

from marketplace.core.models import AuditLog
from marketplace.tenants.models import Membership, Tenant
from tests.factories import MembershipFactory, TenantFactory, UserFactory


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"} and error["message"]
    return error


@pytest.fixture
def owner(tenant):
    return MembershipFactory(tenant=tenant, role="owner").user


@pytest.fixture
def owner_api(api_client_for, owner, tenant):
    return api_client_for(owner, tenant)


@pytest.mark.django_db
class TestCurrentTenant:
    def test_shows_the_token_tenant_and_my_role(self, api, tenant):
        body = api.get("/api/v1/tenant/").json()
        assert body == {"slug": tenant.slug, "name": tenant.name, "billing_status": "good",
                        "gpu_quota": tenant.gpu_quota, "is_active": True, "can_book": True, "your_role": "member"}

    def test_staff_without_a_tenant_gets_403(self, api_client_for, staff_user):
        assert_error(api_client_for(staff_user).get("/api/v1/tenant/"), 403)


@pytest.mark.django_db
class TestMembers:
    def test_lists_members_of_my_tenant_only(self, api, tenant, member, other_tenant):
        MembershipFactory(tenant=other_tenant)
        usernames = [row["username"] for row in api.get("/api/v1/members/").json()["results"]]
        assert usernames == [member.username]

    def test_owner_adds_an_existing_user_and_changes_a_role(self, owner_api, tenant):
        newcomer = UserFactory()
        added = owner_api.post("/api/v1/members/", {"username": newcomer.username, "role": "viewer"}, format="json")
        assert added.status_code == 201, added.content
        changed = owner_api.patch(f"/api/v1/members/{added.json()['id']}/", {"role": "member"}, format="json")
        assert changed.json()["role"] == "member"
        actions = sorted(AuditLog.objects.filter(object_type="tenants.membership").values_list("action", flat=True))
        assert actions == ["membership.create", "membership.update"]

    def test_a_member_who_is_not_owner_cannot_add(self, api):
        newcomer = UserFactory()
        assert_error(api.post("/api/v1/members/", {"username": newcomer.username}, format="json"), 403)
        assert not Membership.objects.filter(user=newcomer).exists()

    @pytest.mark.parametrize("body,field", [
        ({}, "username"), ({"username": "ghost"}, "username"), ({"username": "__existing__", "role": "god"}, "role"),
    ])
    def test_bad_member_input_is_400(self, owner_api, body, field):
        if body.get("username") == "__existing__":
            body["username"] = UserFactory().username
        error = assert_error(owner_api.post("/api/v1/members/", body, format="json"), 400)
        assert field in error["fields"]

    def test_adding_someone_twice_is_400_with_the_constraint_message(self, owner_api, member):
        error = assert_error(owner_api.post("/api/v1/members/", {"username": member.username}, format="json"), 400)
        assert "This user is already a member of this tenant." in error["message"]

    def test_the_last_owner_cannot_be_demoted(self, owner_api, owner, tenant):
        mine = Membership.objects.get(user=owner, tenant=tenant)
        error = assert_error(owner_api.patch(f"/api/v1/members/{mine.pk}/", {"role": "viewer"}, format="json"), 409)
        assert error["code"] == "last_owner"
        mine.refresh_from_db()
        assert mine.role == "owner"

    def test_bad_role_change_is_400(self, owner_api, member, tenant):
        theirs = Membership.objects.get(user=member, tenant=tenant)
        assert_error(owner_api.patch(f"/api/v1/members/{theirs.pk}/", {"role": "admin"}, format="json"), 400)
        assert_error(owner_api.patch(f"/api/v1/members/{theirs.pk}/", {}, format="json"), 400)

    def test_member_list_is_a_fixed_number_of_queries(self, api, tenant, django_assert_max_num_queries):
        MembershipFactory.create_batch(10, tenant=tenant)
        with django_assert_max_num_queries(8):
            assert len(api.get("/api/v1/members/").json()["results"]) == 11


@pytest.mark.django_db
class TestStaffTenants:
    @pytest.fixture
    def ops(self, api_client_for, staff_user):
        return api_client_for(staff_user)

    def test_ops_create_a_tenant_and_change_billing_and_quota(self, ops):
        created = ops.post("/api/v1/tenants/", {"slug": "deep-co", "name": "Deep Co", "gpu_quota": 32}, format="json")
        assert created.status_code == 201, created.content
        changed = ops.patch("/api/v1/tenants/deep-co/", {"billing_status": "suspended", "gpu_quota": 0}, format="json")
        assert changed.json()["billing_status"] == "suspended" and changed.json()["gpu_quota"] == 0
        row = AuditLog.objects.get(action="tenant.update")
        assert row.before["billing_status"] == "good" and row.after["billing_status"] == "suspended"

    @pytest.mark.parametrize("body,field", [
        ({"name": "x"}, "slug"), ({"slug": "Bad_Slug", "name": "x"}, "__all__"), ({"slug": "ok", "name": ""}, "name"),
        ({"slug": "ok", "name": "x", "gpu_quota": -1}, "gpu_quota"),
        ({"slug": "ok", "name": "x", "billing_status": "rich"}, "billing_status"),
    ])
    def test_bad_tenant_input_is_400_and_creates_nothing(self, ops, body, field):
        error = assert_error(ops.post("/api/v1/tenants/", body, format="json"), 400)
        assert field in error["fields"]
        assert not Tenant.objects.exists()

    def test_duplicate_slug_is_400(self, ops):
        existing = TenantFactory()
        assert_error(ops.post("/api/v1/tenants/", {"slug": existing.slug, "name": "x"}, format="json"), 400)

    @pytest.mark.parametrize("change", [{"billing_status": "rich"}, {"gpu_quota": "lots"}, {"name": ""}])
    def test_bad_tenant_change_is_400_and_changes_nothing(self, ops, change):
        existing = TenantFactory()
        assert_error(ops.patch(f"/api/v1/tenants/{existing.slug}/", change, format="json"), 400)
        existing.refresh_from_db()
        assert (existing.billing_status, existing.gpu_quota) == ("good", 1024)

    def test_tenants_cannot_use_the_staff_api(self, api):
        assert_error(api.get("/api/v1/tenants/"), 403)
        assert_error(api.post("/api/v1/tenants/", {"slug": "mine", "name": "x"}, format="json"), 403)
