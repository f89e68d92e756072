"""List endpoints answer in a fixed number of queries, however many rows there are."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.core.services import Actor, audit_record
from marketplace.inventory.models import MaintenanceWindow
from marketplace.tenants import services
from tests.factories import ClusterFactory, GpuPriceFactory, NodeFactory, RegionFactory, TenantFactory

ROWS = 12


def tokens(tenant, user):
    for n in range(ROWS):
        services.api_token_issue(actor=Actor.for_user(user), user=user, tenant=tenant, name=f"t{n}")


def audit_rows(tenant, user):
    for n in range(ROWS):
        audit_record(actor=Actor.for_user(user), action="check", obj=tenant, tenant=tenant, message=str(n))


def windows(tenant, user):
    start = timezone.now() + timedelta(days=1)
    for node in NodeFactory.create_batch(ROWS):
        MaintenanceWindow.objects.create(node=node, starts_at=start, ends_at=start + timedelta(hours=1))


def prices(tenant, user):
    for n in range(ROWS):
        GpuPriceFactory(region=RegionFactory(code=f"r{n}"))


TENANT_LISTS = [("/api/v1/tokens/", tokens), ("/api/v1/audit-log/", audit_rows), ("/api/v1/gpu-prices/", prices),
                ("/api/v1/regions/", prices)]
OPS_LISTS = [("/api/v1/maintenance-windows/", windows),
             ("/api/v1/clusters/", lambda t, u: ClusterFactory.create_batch(ROWS)),
             ("/api/v1/tenants/", lambda t, u: TenantFactory.create_batch(ROWS))]


@pytest.mark.django_db
@pytest.mark.parametrize("path,make", TENANT_LISTS, ids=[p for p, _ in TENANT_LISTS])
def test_tenant_lists_take_a_fixed_number_of_queries(path, make, api, member, tenant, django_assert_max_num_queries):
    make(tenant, member)
    api.get(path)  # the token's last-use write happens on the first call only
    with django_assert_max_num_queries(5):
        response = api.get(path)
    assert response.status_code == 200 and len(response.json()["results"]) >= ROWS


@pytest.mark.django_db
@pytest.mark.parametrize("path,make", OPS_LISTS, ids=[p for p, _ in OPS_LISTS])
def test_ops_lists_take_a_fixed_number_of_queries(path, make, api_client_for, staff_user, tenant,
                                                  django_assert_max_num_queries):
    make(tenant, staff_user)
    client = api_client_for(staff_user)
    with django_assert_max_num_queries(4):
        response = client.get(path)
    assert response.status_code == 200 and len(response.json()["results"]) >= ROWS
