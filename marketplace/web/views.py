from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from marketplace.inventory.selectors import fleet_gpu_counts
from marketplace.tenants.selectors import request_tenant


@login_required
def dashboard(request):
    tenant = request_tenant(request)
    context = {"tenant": tenant}
    if request.user.is_staff:
        context["fleet"] = fleet_gpu_counts()
    return render(request, "web/dashboard.html", context)
