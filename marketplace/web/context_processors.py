from marketplace.tenants.selectors import memberships_for_user, request_tenant


def current_tenant(request):
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {"current_tenant": None, "switchable_memberships": []}
    memberships = sorted(memberships_for_user(user=request.user), key=lambda membership: membership.tenant.slug)
    return {
        "current_tenant": request_tenant(request),
        # The switcher only appears for users in more than one tenant.
        "switchable_memberships": memberships if len(memberships) > 1 else [],
    }
