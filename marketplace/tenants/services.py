import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.core.exceptions import Conflict, InvalidInput, NotFound, PermissionDenied
from marketplace.core.services import Actor, audit_record, audited_update, snapshot
from marketplace.tenants.models import ApiToken, Membership, Tenant

TOKEN_PREFIX = "gpm_"
# Updating last_used_at on every request would turn every API read into a write; once a minute
# is as precise as anyone reading the token list needs.
LAST_USED_RESOLUTION_SECONDS = 60

TENANT_AUDIT_FIELDS = ["slug", "name", "billing_status", "gpu_quota", "kubernetes_group", "is_active"]


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    raw: str


def tenant_create(
    *, actor: Actor, slug: str, name: str, gpu_quota: int = 64, kubernetes_group: str = "",
    billing_status: str = Tenant.BillingStatus.GOOD,
) -> Tenant:
    if Tenant.objects.filter(slug=slug).exists():
        raise InvalidInput("A tenant with this slug already exists.", fields={"slug": ["already taken"]})
    with transaction.atomic():
        tenant = Tenant(slug=slug, name=name, gpu_quota=gpu_quota, kubernetes_group=kubernetes_group,
                        billing_status=billing_status)
        tenant.full_clean()
        tenant.save()
        audit_record(actor=actor, action="tenant.create", obj=tenant, tenant=tenant,
                     after=snapshot(tenant, TENANT_AUDIT_FIELDS))
    return tenant


def tenant_update(*, actor: Actor, tenant: Tenant, **changes) -> Tenant:
    return audited_update(
        actor=actor, obj=tenant, changes=changes, audit_fields=TENANT_AUDIT_FIELDS, action="tenant.update",
        allowed={"name", "billing_status", "gpu_quota", "kubernetes_group", "is_active"}, tenant=tenant,
    )


def membership_add(*, actor: Actor, tenant: Tenant, user: AbstractBaseUser, role: str) -> Membership:
    if role not in Membership.Role.values:
        raise InvalidInput(f"Unknown role {role!r}.", fields={"role": [f"one of {', '.join(Membership.Role.values)}"]})
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(user=user, tenant=tenant, defaults={"role": role})
        if not created and membership.role != role:
            before = snapshot(membership, ["role"])
            membership.role = role
            membership.save(update_fields=["role"])
            audit_record(actor=actor, action="membership.update", obj=membership, tenant=tenant,
                         before=before, after=snapshot(membership, ["role"]))
        elif created:
            audit_record(actor=actor, action="membership.create", obj=membership, tenant=tenant,
                         after=snapshot(membership, ["user", "tenant", "role"]))
    return membership


def _require_owner(*, by: AbstractBaseUser, tenant: Tenant) -> None:
    # Staff (ops) manage every tenant's members; inside a tenant only owners do.
    if by.is_staff:
        return
    if not Membership.objects.filter(user=by, tenant=tenant, role=Membership.Role.OWNER).exists():
        raise PermissionDenied("Only an owner of this tenant can manage its members.")


def membership_create(*, actor: Actor, by: AbstractBaseUser, tenant: Tenant, username: str, role: str) -> Membership:
    """Adds an existing user to the tenant with a role (owners only)."""
    _require_owner(by=by, tenant=tenant)
    if role not in Membership.Role.values:
        raise InvalidInput(f"Unknown role {role!r}.", fields={"role": [f"one of {', '.join(Membership.Role.values)}"]})
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise InvalidInput(f"No active user named {username!r}.", fields={"username": ["no such user"]})
    membership = Membership(user=user, tenant=tenant, role=role)
    try:
        membership.full_clean()  # the unique constraint's own message if they are already a member
    except ValidationError as exc:
        raise InvalidInput(" ".join(exc.messages), fields={"username": exc.messages}) from exc
    try:
        with transaction.atomic():
            membership.save()
            audit_record(actor=actor, action="membership.create", obj=membership, tenant=tenant,
                         after=snapshot(membership, ["user", "tenant", "role"]))
    except IntegrityError as exc:  # added by someone else since the check above
        raise InvalidInput("This user is already a member of this tenant.",
                           fields={"username": ["already a member"]}) from exc
    return membership


def membership_change_role(*, actor: Actor, by: AbstractBaseUser, tenant: Tenant, membership_id: int,
                           role: str) -> Membership:
    """Changes a member's role (owners only). A tenant always keeps at least one owner."""
    _require_owner(by=by, tenant=tenant)
    if role not in Membership.Role.values:
        raise InvalidInput(f"Unknown role {role!r}.", fields={"role": [f"one of {', '.join(Membership.Role.values)}"]})
    with transaction.atomic():
        # Lock every owner row of the tenant so two owners cannot demote each other at once.
        owners = list(Membership.objects.select_for_update().filter(tenant=tenant, role=Membership.Role.OWNER))
        membership = Membership.objects.for_tenant(tenant).select_for_update().filter(pk=membership_id).first()
        if membership is None:
            raise NotFound("No such member.")
        if membership.role == role:
            return membership
        if membership.role == Membership.Role.OWNER and len(owners) == 1:
            raise Conflict("A tenant needs at least one owner; make someone else owner first.", code="last_owner",
                           fields={"role": ["the last owner cannot be demoted"]})
        before = snapshot(membership, ["role"])
        membership.role = role
        membership.save(update_fields=["role"])
        audit_record(actor=actor, action="membership.update", obj=membership, tenant=tenant,
                     before=before, after=snapshot(membership, ["role"]))
    return membership


def api_token_issue(
    *, actor: Actor, user: AbstractBaseUser, tenant: Tenant, name: str, expires_at: datetime | None = None
) -> IssuedToken:
    name = (name or "").strip()
    if not name:
        raise InvalidInput("A token needs a name.", fields={"name": ["This field is required."]})
    if len(name) > 100:
        raise InvalidInput("Token name is too long.", fields={"name": ["At most 100 characters."]})
    if expires_at is not None and expires_at <= timezone.now():
        raise InvalidInput("Expiry must be in the future.", fields={"expires_at": ["must be in the future"]})
    if not user.is_staff and not Membership.objects.filter(user=user, tenant=tenant).exists():
        raise PermissionDenied("You are not a member of this tenant.")
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        token = ApiToken.objects.create(
            user=user, tenant=tenant, name=name, prefix=raw[: len(TOKEN_PREFIX) + 8],
            key_hash=hash_token(raw), expires_at=expires_at,
        )
        audit_record(actor=actor, action="api_token.issue", obj=token, tenant=tenant,
                     after=snapshot(token, ["name", "prefix", "user", "expires_at"]))
    return IssuedToken(token=token, raw=raw)


def api_token_revoke(*, actor: Actor, token_id: int, tenant: Tenant, user: AbstractBaseUser | None = None) -> ApiToken:
    """Revokes a token of the tenant (of ``user`` only, when given). Revoking twice changes nothing."""
    with transaction.atomic():
        tokens = ApiToken.objects.for_tenant(tenant)
        if user is not None:
            tokens = tokens.filter(user=user)
        token = tokens.select_for_update().filter(pk=token_id).first()
        if token is None:
            raise NotFound("No such token.")
        if token.revoked_at is None:
            before = snapshot(token, ["revoked_at"])
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
            audit_record(actor=actor, action="api_token.revoke", obj=token, tenant=tenant,
                         before=before, after=snapshot(token, ["revoked_at"]))
    return token


def api_token_touch(*, token: ApiToken) -> None:
    now = timezone.now()
    if token.last_used_at and (now - token.last_used_at).total_seconds() < LAST_USED_RESOLUTION_SECONDS:
        return
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    token.last_used_at = now


def user_create(*, username: str, password: str, email: str = "", is_staff: bool = False):
    User = get_user_model()
    user = User(username=username, email=email, is_staff=is_staff)
    user.set_password(password)
    user.full_clean(exclude=["password"])
    user.save()
    return user
