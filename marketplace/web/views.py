from functools import wraps

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from marketplace.inventory.selectors import FLEET_STATES, fleet_gpu_counts, fleet_utilisation
from marketplace.tenants.selectors import SESSION_TENANT_KEY, memberships_for_user, request_tenant
from marketplace.web.forms import row_id


def staff_required(view):
    """Ops pages: anonymous users go to the login page, signed-in tenants get a 403."""

    @wraps(view)
    @login_required
    def wrapped(request, *args, **kwargs):
        if not request.user.is_staff:
            raise PermissionDenied("Operations staff only.")
        return view(request, *args, **kwargs)

    return wrapped


def tenant_required(view):
    """Tenant pages act for the session's tenant; a user without one is sent to the dashboard."""

    @wraps(view)
    @login_required
    def wrapped(request, *args, **kwargs):
        tenant = request_tenant(request)
        if tenant is None:
            messages.error(request, "You are not a member of any tenant.")
            return redirect("web:dashboard")
        return view(request, tenant, *args, **kwargs)

    return wrapped


@login_required
def dashboard(request):
    tenant = request_tenant(request)
    context = {"tenant": tenant}
    if request.user.is_staff:
        counts = fleet_gpu_counts()
        context["states"] = FLEET_STATES
        context["by_model"] = fleet_utilisation(by="gpu_model", counts=counts)
    return render(request, "web/dashboard.html", context)


@login_required
@require_POST
def tenant_switch(request):
    """The tenant switcher: the session acts for one of the user's memberships at a time."""
    tenant_id = row_id(request.POST.get("tenant", ""))
    membership = memberships_for_user(user=request.user).filter(tenant_id=tenant_id).first()
    if membership is None:
        messages.error(request, "You are not a member of that tenant.")
    else:
        request.session[SESSION_TENANT_KEY] = membership.tenant_id
        messages.success(request, f"Now acting for {membership.tenant.name}.")
    target = request.POST.get("next", "")
    # Only a path on this site; redirect() would take anything else for a view name and fail.
    if target.startswith("/") and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                                  require_https=request.is_secure()):
        return HttpResponseRedirect(target)
    return redirect("web:dashboard")
