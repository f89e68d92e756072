"""Scheduler pages: a tenant's pool detail, and the ops scheduler-health page with retry."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from marketplace.core.exceptions import ServiceError
from marketplace.core.services import Actor
from marketplace.pools import selectors, services
from marketplace.pools.selectors import PLAN_ONLY_LABEL, usage_instructions
from marketplace.reservations.models import Reservation
from marketplace.tenants.selectors import request_tenant
from marketplace.web.views import staff_required


@login_required
def pool_detail(request, reservation_id):
    tenant = request_tenant(request)
    try:
        view = selectors.pool_for_tenant(tenant=tenant, reservation_id=reservation_id)
    except Reservation.DoesNotExist:
        raise Http404("No such pool.") from None
    return render(request, "web/scheduler/pool_detail.html", {
        "pool": view, "reservation": view.reservation, "usage": usage_instructions(view),
        "plan_only_label": PLAN_ONLY_LABEL,
    })


@staff_required
def scheduler_health(request):
    health = selectors.scheduler_health(now=timezone.now())
    return render(request, "web/scheduler/health.html", {"health": health})


@staff_required
@require_POST
def scheduler_retry(request, reservation_id):
    try:
        services.reservation_retry(reservation_id=reservation_id, actor=Actor.for_user(request.user),
                                   now=timezone.now())
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Reservation {reservation_id} is confirmed again and will be provisioned.")
    return redirect("web:scheduler-health")
