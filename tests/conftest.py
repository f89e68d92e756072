import pytest
from django.db import connection
from rest_framework.test import APIClient

from marketplace.core.services import Actor
from marketplace.tenants import services as tenant_services
from tests.factories import MembershipFactory, TenantFactory, UserFactory


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test starts with an empty cache: a calendar cached by one test is not another's."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


def pytest_collection_modifyitems(config, items):
    from django.conf import settings

    if settings.DATABASE_IS_POSTGRES:
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL to a PostgreSQL server)")
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tenant(db):
    return TenantFactory()


@pytest.fixture
def other_tenant(db):
    return TenantFactory()


@pytest.fixture
def member(tenant):
    return MembershipFactory(tenant=tenant, role="member").user


@pytest.fixture
def staff_user(db):
    return UserFactory(is_staff=True, username="ops-user")


def issue_token(user, tenant) -> str:
    return tenant_services.api_token_issue(
        actor=Actor.for_user(user), user=user, tenant=tenant, name="test"
    ).raw


@pytest.fixture
def api_client_for(db):
    """``api_client_for(user, tenant)``: an APIClient authenticated with a fresh bearer token."""

    def make(user, tenant=None) -> APIClient:
        # CSRF enforced as in production: a token client never holds a CSRF cookie.
        client = APIClient(enforce_csrf_checks=True)
        if tenant is None:
            client.force_authenticate(user=user)
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(user, tenant)}")
        return client

    return make


@pytest.fixture
def api(api_client_for, member, tenant) -> APIClient:
    """A member of ``tenant`` calling the API with a token."""
    return api_client_for(member, tenant)


@pytest.fixture
def is_postgres() -> bool:
    return connection.vendor == "postgresql"
