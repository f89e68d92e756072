"""Ops pages: fleet utilisation, inventory with maintenance windows, the audit log."""

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from marketplace.core.exceptions import ServiceError
from marketplace.core.selectors import audit_log_list
from marketplace.core.services import Actor
from marketplace.inventory import selectors, services
from marketplace.inventory.models import Node
from marketplace.web.forms import MaintenanceWindowForm, NodeStatusForm, add_service_error
from marketplace.web.views import staff_required

PAGE_SIZE = 100


@staff_required
def fleet(request):
    counts = selectors.fleet_gpu_counts()
    return render(request, "web/ops/fleet.html", {
        "states": selectors.FLEET_STATES,
        "groups": [("GPU model", selectors.fleet_utilisation(by="gpu_model", counts=counts)),
                   ("Region", selectors.fleet_utilisation(by="region", counts=counts)),
                   ("Cluster", selectors.fleet_utilisation(by="cluster", counts=counts))],
        "at": timezone.now(),
    })


@staff_required
def inventory(request):
    filters = {key: request.GET[param] for param, key in
               [("cluster", "cluster__name"), ("status", "status"), ("gpu_model", "gpu_model__name")]
               if request.GET.get(param)}
    nodes = selectors.node_list(filters=filters)
    page = Paginator(nodes, PAGE_SIZE).get_page(request.GET.get("page"))
    window_form = MaintenanceWindowForm(request.POST or None, nodes=selectors.node_list())
    if request.method == "POST" and window_form.is_valid():
        try:
            window, holds = services.maintenance_window_create(actor=Actor.for_user(request.user),
                                                               **window_form.cleaned_data)
        except ServiceError as error:
            add_service_error(window_form, error)
        else:
            note = f" It overlaps {len(holds)} booking(s)." if holds else ""
            messages.success(request, f"Maintenance planned for {window.node.name}.{note}")
            return redirect("web:ops-inventory")
    windows = selectors.maintenance_window_list(filters={"cancelled_at__isnull": True, "ends_at__gt": timezone.now()})
    return render(request, "web/ops/inventory.html", {
        "page": page, "windows": windows, "window_form": window_form, "statuses": Node.Status.choices,
        "clusters": selectors.cluster_list(), "gpu_models": selectors.gpu_model_catalogue(), "filters": request.GET,
    }, status=400 if window_form.errors else 200)


@staff_required
@require_POST
def node_status(request):
    form = NodeStatusForm(request.POST)
    if not form.is_valid():
        # The form lives on the inventory page: what was wrong travels as a message.
        problems = [f"{name}: {' '.join(errors)}" for name, errors in form.errors.items()
                    if name not in ("nodes", "status")]
        messages.error(request, " ".join(["Choose nodes and a status." if {"nodes", "status"} & set(form.errors)
                                          else "Nothing changed.", *problems]))
        return redirect("web:ops-inventory")
    try:
        change = services.node_bulk_set_status(
            actor=Actor.for_user(request.user), node_ids=[node.pk for node in form.cleaned_data["nodes"]],
            status=form.cleaned_data["status"], reason=form.cleaned_data["reason"], force=form.cleaned_data["force"],
        )
    except ServiceError as error:
        messages.error(request, " ".join([error.message, *error.fields.get("node_ids", [])]))
    else:
        messages.success(request, f"{len(change.nodes)} node(s) now {form.cleaned_data['status']}.")
        for hold in change.affected_allocations:
            messages.warning(request, hold.describe())
    return redirect("web:ops-inventory")


@staff_required
@require_POST
def window_cancel(request, window_id: int):
    try:
        window = services.maintenance_window_cancel(actor=Actor.for_user(request.user), window_id=window_id)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Maintenance of {window.node.name} cancelled.")
    return redirect("web:ops-inventory")


@staff_required
def audit_log(request):
    filters = {key: request.GET.get(key, "").strip() for key in ["action", "object_type", "actor", "tenant_slug"]}
    page = Paginator(audit_log_list(**filters), PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "web/ops/audit.html", {"page": page, "filters": filters})
