"""One error shape for every failure under /api/, and a schema that generates cleanly."""

import pytest
from django.core.management import call_command

ERROR_KEYS = {"code", "message", "fields"}


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == code and error["message"]
    return error


@pytest.mark.django_db
class TestErrorShape:
    @pytest.mark.parametrize("path", ["/api/nope", "/api/v1/no-such-thing/", "/api/v2/tokens/"])
    def test_unknown_api_url_is_json_404(self, api, path):
        assert_error(api.get(path), 404, "not_found")

    @pytest.mark.parametrize("path", ["/api/v1/reservations//cancel/", "/api/v1/no-such-thing/"])
    def test_a_write_to_an_unknown_api_url_is_json_404_too(self, api, path):
        # Not the HTML page of a CSRF refusal: the catch-all writes nothing, and a token client has no cookie.
        assert_error(api.post(path, {}, format="json"), 404, "not_found")

    def test_a_token_expiry_without_a_utc_offset_is_400(self, api):
        error = assert_error(api.post("/api/v1/tokens/", {"name": "ci", "expires_at": "2030-01-02T10:00:00"},
                                      format="json"), 400, "invalid")
        assert "must carry a timezone" in str(error["fields"]["expires_at"])

    def test_unknown_object_is_json_404(self, api):
        assert_error(api.get("/api/v1/tokens/999999/"), 404, "not_found")

    def test_wrong_method_is_405(self, api):
        error = assert_error(api.delete("/api/v1/tokens/"), 405, "method_not_allowed")
        assert "DELETE" in error["message"]

    def test_unsupported_content_type_is_415(self, api):
        response = api.generic("POST", "/api/v1/tokens/", "name=x", content_type="text/plain")
        assert_error(response, 415, "unsupported_media_type")

    def test_malformed_json_is_400(self, api):
        response = api.generic("POST", "/api/v1/tokens/", '{"name": ', content_type="application/json")
        assert_error(response, 400, "parse_error")

    def test_validation_error_names_the_fields(self, api):
        error = assert_error(api.post("/api/v1/tokens/", {}, format="json"), 400, "invalid")
        assert "name" in error["fields"]


def test_openapi_schema_generates_without_warnings(tmp_path, db):
    # drf-spectacular's own validation: fails on any warning or error while generating
    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    assert "/api/v1/tokens/" in target.read_text()


@pytest.mark.django_db
def test_schema_and_docs_are_served(client):
    assert client.get("/api/schema/").status_code == 200
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()
