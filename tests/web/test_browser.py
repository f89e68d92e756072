"""The UI in a real browser: headless Chromium (Debian's package) driven by Playwright, against a live server.

Database rows are made before the browser starts and checked after it closes: Playwright's sync API
runs an event loop in this thread, and Django refuses database calls from inside one.
"""

import os
import shutil

import pytest
from django.test import Client

from marketplace.tenants.models import ApiToken
from marketplace.tenants.services import hash_token
from tests.factories import MembershipFactory

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/test installs it)")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (scripts/test installs Debian's chromium as root)")


@pytest.fixture
def alice(transactional_db):
    membership = MembershipFactory(role="owner", user__username="alice-browser", tenant__name="Acme Browser Lab")
    return membership


def sign_in_and_create_token(base_url: str, username: str) -> dict:
    """Drives the browser; returns what the pages showed. No database access in here."""
    seen = {}
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{base_url}/login/")
            page.fill("#id_username", username)
            page.fill("#id_password", "correct-horse-battery")
            page.click("button[type=submit]")
            page.wait_for_selector("h1")
            seen["dashboard_heading"] = page.inner_text("h1")
            page.click("text=API tokens")
            page.fill("#id_name", "from-the-browser")
            page.click("text=Create token")
            seen["secret"] = page.inner_text("#token-secret").strip()
            page.goto(f"{base_url}/account/tokens/")
            seen["tokens_page_later"] = page.content()
        finally:
            browser.close()
    return seen


def test_sign_in_see_dashboard_and_create_a_token(live_server, alice):
    # given a tenant owner with a password
    tenant_name = alice.tenant.name
    # when they sign in through the login form and create a token on the tokens page
    seen = sign_in_and_create_token(live_server.url, alice.user.username)
    # then the dashboard showed their tenant, and the secret was shown once
    assert seen["dashboard_heading"] == tenant_name
    secret = seen["secret"]
    assert secret.startswith("gpm_")
    assert secret not in seen["tokens_page_later"] and "from-the-browser" in seen["tokens_page_later"]
    # and the token is stored hashed and works against the API
    token = ApiToken.objects.get(name="from-the-browser")
    assert token.key_hash == hash_token(secret)
    response = Client().get("/api/v1/tenant/", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200 and response.json()["name"] == tenant_name
