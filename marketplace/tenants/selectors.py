from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from marketplace.tenants.models import ApiToken, Membership, Tenant
from marketplace.tenants.services import hash_token

SESSION_TENANT_KEY = "tenant_id"


def api_token_authenticate(*, raw: str) -> ApiToken | None:
    """The live token for this secret, or None (unknown, revoked, expired or inactive user)."""
    token = (
        ApiToken.objects.select_related("user", "tenant")
        .filter(key_hash=hash_token(raw), revoked_at__isnull=True)
        .first()
    )
    if token is None or not token.user.is_active or not token.tenant.is_active:
        return None
    if token.expires_at is not None and token.expires_at <= timezone.now():
        return None
    return token


def memberships_for_user(*, user: AbstractBaseUser):
    """The user's memberships, oldest first: the first is the tenant a session acts for until the user
    picks one, so a tenant that adds the user later never becomes that default behind their back."""
    return (Membership.objects.filter(user=user, tenant__is_active=True).select_related("tenant")
            .order_by("created_at", "pk"))


def membership_for(*, user: AbstractBaseUser, tenant: Tenant | None) -> Membership | None:
    if tenant is None or not user.is_authenticated:
        return None
    return Membership.objects.filter(user=user, tenant=tenant).first()


def member_can_write(*, user: AbstractBaseUser, tenant: Tenant | None) -> bool:
    """The user is a member of the tenant whose role may change things (viewers change nothing)."""
    membership = membership_for(user=user, tenant=tenant)
    return membership is not None and membership.can_write


def request_tenant(request) -> Tenant | None:
    """The tenant a request acts for: the token's tenant, else the session's chosen membership.

    Staff without a membership act for no tenant (they are ops). Cached on the request.
    """
    if hasattr(request, "_marketplace_tenant"):
        return request._marketplace_tenant
    tenant = None
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiToken):
        tenant = auth.tenant
    elif request.user.is_authenticated:
        memberships = list(memberships_for_user(user=request.user))
        chosen = request.session.get(SESSION_TENANT_KEY) if hasattr(request, "session") else None
        for membership in memberships:
            if membership.tenant_id == chosen:
                tenant = membership.tenant
                break
        else:
            tenant = memberships[0].tenant if memberships else None
    request._marketplace_tenant = tenant
    return tenant


def api_tokens_of(*, user: AbstractBaseUser, tenant: Tenant):
    """The user's own tokens in this tenant (others' tokens are not theirs to see)."""
    return ApiToken.objects.for_tenant(tenant).filter(user=user).order_by("-created_at")


def members_of(*, tenant: Tenant):
    return Membership.objects.for_tenant(tenant).select_related("user").order_by("user__username")
