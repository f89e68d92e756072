"""Another tenant's objects are invisible (404, absent from lists), not merely forbidden.

``test_every_route_is_scoped`` walks every route of the API router, so an endpoint added later is
covered without anyone remembering to add a test: a tenant-facing endpoint must be built on
``TenantScopedViewSet`` and its model must have a row maker below, or the test fails and says so.
"""

import pytest

from marketplace.api.permissions import IsStaff
from marketplace.api.scoping import TenantScopedMixin
from marketplace.api.urls import router
from marketplace.core.services import Actor, audit_record
from marketplace.tenants import services
from tests.factories import (
    AllocationFactory, MembershipFactory, ReservationFactory, UserFactory,
)

# Models every signed-in caller reads alike, by design (the catalogue). Nothing tenant-owned here.
SHARED_CATALOGUE = {"inventory.region", "inventory.gpumodel", "inventory.gpuprice"}


def _token(tenant, user):
    return services.api_token_issue(actor=Actor.for_user(user), user=user, tenant=tenant, name="scoping").token


def _audit_row(tenant, user):
    return audit_record(actor=Actor.for_user(user), action="scoping.check", obj=tenant, tenant=tenant)


def _reservation_event(tenant, user):
    from marketplace.reservations.models import ReservationEvent

    reservation = ReservationFactory(tenant=tenant, created_by=user)
    return ReservationEvent.objects.create(reservation=reservation, kind="start", due_at=reservation.starts_at)


def _planned_operation(tenant, user):
    from marketplace.pools.models import PlannedOperation

    reservation = ReservationFactory(tenant=tenant, created_by=user)
    return PlannedOperation.objects.create(cluster=reservation.cluster, reservation=reservation, verb="apply",
                                           kind="Namespace", name=f"t-{tenant.slug}", body={}, body_hash="0" * 64)


# One row of each tenant-owned model, made for (tenant, the calling user). A new tenant-facing
# endpoint on a model missing here fails the walk with a message naming the model.
ROW_MAKERS = {
    "tenants.tenant": lambda tenant, user: tenant,
    "tenants.membership": lambda tenant, user: MembershipFactory(tenant=tenant),
    "tenants.apitoken": _token,
    "core.auditlog": _audit_row,
    "reservations.reservation": lambda tenant, user: ReservationFactory(tenant=tenant, created_by=user),
    "reservations.allocation": lambda tenant, user: AllocationFactory(reservation__tenant=tenant,
                                                                      reservation__created_by=user),
    "reservations.reservationevent": _reservation_event,
    "pools.plannedoperation": _planned_operation,
}


def routes():
    return [pytest.param(prefix, viewset, id=prefix) for prefix, viewset, _ in router.registry]


def model_of(viewset):
    if getattr(viewset, "scoped_model", None) is not None:
        return viewset.scoped_model
    return viewset.queryset.model


def is_staff_only(viewset) -> bool:
    return any(isinstance(p, type) and issubclass(p, IsStaff) for p in viewset.permission_classes)


def rows_of(body) -> list[dict]:
    if isinstance(body, dict) and "results" in body:
        return body["results"]
    return body if isinstance(body, list) else [body]


def key_of(viewset, obj) -> str:
    field = getattr(viewset, "lookup_field", "pk")
    return str(getattr(obj, "pk" if field == "pk" else field))


def row_key(viewset, row: dict) -> str:
    field = getattr(viewset, "lookup_field", "pk")
    return str(row["id" if field == "pk" else field])


def belongs_to(model, tenant, viewset, key: str) -> bool:
    if model._meta.label_lower == "tenants.tenant":
        return key == key_of(viewset, tenant)
    field = getattr(viewset, "lookup_field", "pk")
    return model.objects.for_tenant(tenant).filter(**{field: key}).exists()


@pytest.mark.django_db
@pytest.mark.parametrize("prefix,viewset", routes())
def test_every_route_is_scoped(prefix, viewset, api_client_for, tenant, other_tenant):
    # given a member of our tenant, and a stranger in another tenant, each owning one row
    me = MembershipFactory(tenant=tenant, role="owner").user
    stranger = MembershipFactory(tenant=other_tenant, role="owner").user
    client = api_client_for(me, tenant)
    list_url = f"/api/v1/{prefix}/"

    if is_staff_only(viewset):
        # then ops-only endpoints are closed to tenants altogether
        assert client.get(list_url).status_code == 403
        return
    model = model_of(viewset)
    label = model._meta.label_lower
    if label in SHARED_CATALOGUE:
        assert client.get(list_url).status_code == 200
        return
    assert issubclass(viewset, TenantScopedMixin), (
        f"/api/v1/{prefix}/ serves {label} to tenants but is not a TenantScopedViewSet")
    assert label in ROW_MAKERS, f"add a row maker for {label} to ROW_MAKERS so /api/v1/{prefix}/ is checked"
    mine = ROW_MAKERS[label](tenant, me)
    theirs = ROW_MAKERS[label](other_tenant, stranger)

    # when we list
    response = client.get(list_url)
    assert response.status_code == 200, response.content
    keys = [row_key(viewset, row) for row in rows_of(response.json())]
    # then our row is there, theirs is not, and every row listed is ours
    assert key_of(viewset, mine) in keys
    assert key_of(viewset, theirs) not in keys
    assert all(belongs_to(model, tenant, viewset, key) for key in keys), f"{list_url} lists another tenant's rows"

    # and every detail route (read or action) on their row answers 404, as if it did not exist
    if not hasattr(viewset, "retrieve"):
        return
    detail = f"{list_url}{key_of(viewset, theirs)}/"
    assert client.get(detail).status_code == 404
    if hasattr(viewset, "partial_update"):
        assert client.patch(detail, {}, format="json").status_code == 404
    for extra in viewset.get_extra_actions():
        if extra.detail:
            for method in extra.mapping:
                response = client.generic(method.upper(), f"{detail}{extra.url_path}/")
                assert response.status_code == 404, f"{method.upper()} {detail}{extra.url_path}/ is not 404"


@pytest.mark.django_db
def test_other_tenants_tokens_are_invisible_and_stay_live(api, api_client_for, other_tenant):
    # given a token that belongs to another tenant's member
    stranger = MembershipFactory(tenant=other_tenant).user
    theirs = services.api_token_issue(actor=Actor.for_user(stranger), user=stranger, tenant=other_tenant, name="x")
    # when our member tries to revoke it
    revoke = api.post(f"/api/v1/tokens/{theirs.token.pk}/revoke/")
    # then it is not found, and still works for its owner
    assert revoke.status_code == 404 and revoke.json()["error"]["code"] == "not_found"
    theirs.token.refresh_from_db()
    assert theirs.token.revoked_at is None


@pytest.mark.django_db
def test_audit_log_shows_only_own_tenant(api, tenant, other_tenant):
    services.tenant_update(actor=Actor("system"), tenant=other_tenant, gpu_quota=8)
    services.tenant_update(actor=Actor("system"), tenant=tenant, gpu_quota=16)
    rows = api.get("/api/v1/audit-log/", {"action": "tenant.update"}).json()["results"]
    assert [row["object_id"] for row in rows] == [str(tenant.pk)]


@pytest.mark.django_db
def test_a_user_in_two_tenants_sees_the_token_tenant_only(api_client_for, tenant, other_tenant):
    # given one user who belongs to both tenants
    user = UserFactory()
    MembershipFactory(user=user, tenant=tenant)
    MembershipFactory(user=user, tenant=other_tenant)
    # when they call with a token of the other tenant
    client = api_client_for(user, other_tenant)
    # then the API acts for that tenant only
    assert client.get("/api/v1/tenant/").json()["slug"] == other_tenant.slug
    assert {row["username"] for row in client.get("/api/v1/members/").json()["results"]} == {user.username}
