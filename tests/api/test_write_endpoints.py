"""Every write endpoint of the API answers bad input with a 4xx in the error shape and writes nothing.

Routes are discovered from the API router, so endpoints added later are covered too. Ops endpoints
are called by a staff user, tenant endpoints by a tenant owner, each against an existing row.
"""

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.api.permissions import IsStaff, IsStaffOrReadOnly
from marketplace.api.urls import router
from marketplace.core.models import AuditLog
from marketplace.inventory.models import MaintenanceWindow
from tests.conftest import issue_token
from tests.factories import AllocationFactory, GpuPriceFactory, MembershipFactory, NodeFactory, UserFactory

# Refused by every write route, whether or not it reads a body.
BAD_BODIES = [
    ("malformed JSON", '{"name": '),
    ("a list", "[1, 2, 3]"),
    ("a string", '"hello"'),
]
# Refused by every create and update route (the ones that take fields).
WRONG_FIELDS = [
    ("wrong types", json.dumps({"name": {"x": 1}, "status": 12345, "node_ids": "all", "role": None, "username": [],
                                "starts_at": "soon", "gpus": "many", "price_per_gpu_hour": "free",
                                "slug": "Not A Slug", "region": 7})),
]


def write_calls():
    """(label, viewset, method, path, takes_fields) for every write route; {key} is an existing row's key."""
    calls = []
    for prefix, viewset, _ in router.registry:
        base = f"/api/v1/{prefix}/"
        if hasattr(viewset, "create"):
            calls.append((f"POST {base}", viewset, "post", base, True))
        if hasattr(viewset, "partial_update"):
            calls.append((f"PATCH {base}{{key}}/", viewset, "patch", base + "{key}/", True))
        if hasattr(viewset, "update") and "put" in getattr(viewset, "http_method_names", []):
            calls.append((f"PUT {base}{{key}}/", viewset, "put", base + "{key}/", True))
        for extra in viewset.get_extra_actions():
            for method in extra.mapping:
                if method in ("post", "put", "patch"):
                    path = f"{base}{{key}}/{extra.url_path}/" if extra.detail else f"{base}{extra.url_path}/"
                    calls.append((f"{method.upper()} {path}", viewset, method, path, False))
    return [pytest.param(viewset, method, path, fields, id=label) for label, viewset, method, path, fields in calls]


@pytest.fixture
def rows(db):
    """One row behind every route: an owner with a token, a member, inventory, a window, a price, a booking."""
    owner = MembershipFactory(role="owner")
    MembershipFactory(tenant=owner.tenant, role="member")
    allocation = AllocationFactory(reservation__tenant=owner.tenant, reservation__created_by=owner.user)
    ops = UserFactory(is_staff=True)
    node = NodeFactory()
    GpuPriceFactory(gpu_model=node.gpu_model, region=node.cluster.region)
    start = timezone.now() + timedelta(days=1)
    MaintenanceWindow.objects.create(node=node, starts_at=start, ends_at=start + timedelta(hours=2))
    return {"owner": owner, "ops": ops, "reservation": allocation.reservation}


def client_for(viewset, rows) -> APIClient:
    client = APIClient()
    if any(isinstance(p, type) and issubclass(p, (IsStaff, IsStaffOrReadOnly)) for p in viewset.permission_classes):
        client.force_authenticate(rows["ops"])
    else:
        # an owner: every tenant write is open to them
        owner = rows["owner"]
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {issue_token(owner.user, owner.tenant)}")
    return client


# Routes whose list is a report rather than rows name the row their detail actions act on.
DETAIL_KEYS = {
    "/api/v1/ops/scheduler/": lambda rows: rows["reservation"].pk,
}


def first_key(client, viewset, path: str, rows_fixture: dict) -> str:
    base = path.split("{key}")[0]
    if base in DETAIL_KEYS:
        return str(DETAIL_KEYS[base](rows_fixture))
    listed = client.get(base).json()
    rows = listed["results"] if isinstance(listed, dict) and "results" in listed else listed
    rows = rows if isinstance(rows, list) else [rows]
    field = getattr(viewset, "lookup_field", "pk")
    assert rows, f"no row to write to under {path}: add one to the rows fixture"
    return str(rows[0]["id" if field == "pk" else field])


@pytest.mark.django_db
@pytest.mark.parametrize("viewset,method,path,takes_fields", write_calls())
def test_every_write_endpoint_refuses_bad_input(viewset, method, path, takes_fields, rows):
    client = client_for(viewset, rows)
    if "{key}" in path:
        path = path.format(key=first_key(client, viewset, path, rows))
    audit_rows = AuditLog.objects.count()
    for label, body in BAD_BODIES + (WRONG_FIELDS if takes_fields else []):
        # when the endpoint gets a bad body
        response = client.generic(method.upper(), path, body, content_type="application/json")
        # then it answers 4xx with the error shape, and nothing was written
        assert 400 <= response.status_code < 500, f"{method.upper()} {path} with {label}: {response.status_code}"
        error = response.json()["error"]
        assert set(error) == {"code", "message", "fields"} and error["message"], f"{path} with {label}"
        assert AuditLog.objects.count() == audit_rows, f"{method.upper()} {path} with {label} wrote something"
    wrong_type = client.generic(method.upper(), path, "a=1", content_type="text/plain")
    assert wrong_type.status_code == 415, f"{method.upper()} {path} accepted text/plain"
