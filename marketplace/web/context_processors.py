from marketplace.tenants.selectors import request_tenant


def current_tenant(request):
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {"current_tenant": None}
    return {"current_tenant": request_tenant(request)}
