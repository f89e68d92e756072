from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.tenants import services
from marketplace.tenants.models import ApiToken


@pytest.mark.django_db
class TestTokenAuth:
    def test_valid_token_authenticates_and_records_last_use(self, api_client_for, member, tenant):
        # given a token issued to a member
        issued = services.api_token_issue(actor=Actor.for_user(member), user=member, tenant=tenant, name="ci")
        client = api_client_for(member)
        client.force_authenticate(user=None)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
        # when it calls the API
        response = client.get("/api/v1/tokens/")
        # then it is let in, and the token's last use is recorded
        assert response.status_code == 200
        issued.token.refresh_from_db()
        assert issued.token.last_used_at is not None

    def test_only_the_hash_is_stored(self, member, tenant):
        issued = services.api_token_issue(actor=Actor.for_user(member), user=member, tenant=tenant, name="ci")
        row = ApiToken.objects.get(pk=issued.token.pk)
        assert issued.raw not in (row.key_hash, row.prefix)
        assert row.key_hash == services.hash_token(issued.raw)

    @pytest.mark.parametrize("header", ["Bearer gpm_wrong", "Bearer", "Bearer a b", "Token nope"])
    def test_wrong_or_malformed_token_is_rejected_with_error_shape(self, client, header, db):
        response = client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=header)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "authentication_failed"
        assert response.json()["error"]["message"]

    def test_revoked_token_is_rejected(self, client, member, tenant):
        issued = services.api_token_issue(actor=Actor.for_user(member), user=member, tenant=tenant, name="ci")
        services.api_token_revoke(actor=Actor.for_user(member), token_id=issued.token.pk, tenant=tenant)
        response = client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
        assert response.status_code == 401

    def test_expired_token_is_rejected(self, client, member, tenant):
        issued = services.api_token_issue(
            actor=Actor.for_user(member), user=member, tenant=tenant, name="ci",
            expires_at=timezone.now() + timedelta(minutes=5),
        )
        ApiToken.objects.filter(pk=issued.token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        response = client.get("/api/v1/tokens/", HTTP_AUTHORIZATION=f"Bearer {issued.raw}")
        assert response.status_code == 401

    def test_no_credentials_is_401_with_error_shape(self, client, db):
        response = client.get("/api/v1/tokens/")
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"code", "message", "fields"}


@pytest.mark.django_db
class TestTokenApi:
    def test_create_shows_secret_once_then_revoke_via_api(self, api, tenant):
        created = api.post("/api/v1/tokens/", {"name": "laptop"}, format="json")
        assert created.status_code == 201
        assert created.json()["token"].startswith("gpm_")
        listed = api.get(f"/api/v1/tokens/{created.json()['id']}/").json()
        assert "token" not in listed
        revoked = api.post(f"/api/v1/tokens/{created.json()['id']}/revoke/")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert AuditLog.objects.filter(action="api_token.revoke", object_id=str(created.json()["id"])).exists()

    @pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "x" * 101}, {"name": "a", "expires_at": "not-a-date"},
                                      {"name": "a", "expires_at": "2001-01-01T00:00:00Z"}])
    def test_bad_input_is_400_with_fields(self, api, body):
        response = api.post("/api/v1/tokens/", body, format="json")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid" and error["message"] and error["fields"]
        assert ApiToken.objects.filter(name__in=["", "a"]).count() == 0

    def test_viewer_cannot_create_tokens(self, api_client_for, tenant):
        from tests.factories import MembershipFactory

        viewer = MembershipFactory(tenant=tenant, role="viewer").user
        client = api_client_for(viewer, tenant)
        response = client.post("/api/v1/tokens/", {"name": "x"}, format="json")
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"


@pytest.mark.django_db
def test_session_calls_to_the_api_need_the_csrf_token(member, tenant):
    # given a member signed in to the web UI (a session cookie, no API token)
    from rest_framework.test import APIClient

    client = APIClient(enforce_csrf_checks=True)
    client.force_login(member)
    # when a page's script writes through the API without the CSRF token
    response = client.post("/api/v1/tokens/", {"name": "from-a-page"}, format="json")
    # then it is refused, and nothing is created
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]
    assert not ApiToken.objects.filter(name="from-a-page").exists()
