"""Another tenant's objects are invisible (404, absent from lists), not merely forbidden."""

import pytest

from marketplace.core.services import Actor
from marketplace.tenants import services
from tests.factories import MembershipFactory


@pytest.mark.django_db
def test_other_tenants_tokens_are_invisible(api, api_client_for, other_tenant):
    # given a token that belongs to another tenant's member
    stranger = MembershipFactory(tenant=other_tenant).user
    theirs = services.api_token_issue(actor=Actor.for_user(stranger), user=stranger, tenant=other_tenant, name="x")
    # when our member lists and fetches tokens
    listed = api.get("/api/v1/tokens/").json()["results"]
    fetched = api.get(f"/api/v1/tokens/{theirs.token.pk}/")
    revoke = api.post(f"/api/v1/tokens/{theirs.token.pk}/revoke/")
    # then it is not there at all
    assert theirs.token.pk not in [row["id"] for row in listed]
    assert fetched.status_code == 404 and fetched.json()["error"]["code"] == "not_found"
    assert revoke.status_code == 404
    theirs.token.refresh_from_db()
    assert theirs.token.revoked_at is None


@pytest.mark.django_db
def test_audit_log_shows_only_own_tenant(api, tenant, other_tenant):
    services.tenant_update(actor=Actor("system"), tenant=other_tenant, gpu_quota=8)
    services.tenant_update(actor=Actor("system"), tenant=tenant, gpu_quota=16)
    rows = api.get("/api/v1/audit-log/", {"action": "tenant.update"}).json()["results"]
    assert [row["object_id"] for row in rows] == [str(tenant.pk)]
