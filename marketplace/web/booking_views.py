"""Tenant pages for booking: search availability, book, list, and cancel/extend/release.

Views only parse forms and call the same services and selectors as the API; every ServiceError
becomes a message on the page.
"""

import uuid
from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from marketplace.core.exceptions import InvalidInput, PermissionDenied, ServiceError
from marketplace.core.services import Actor
from marketplace.inventory.models import GpuModel, Region
from marketplace.reservations import policies, selectors, services
from marketplace.reservations.models import Reservation
from marketplace.reservations.status import ReservationStatus
from marketplace.tenants.selectors import member_can_write, request_tenant

CALENDAR_DAYS = 7
RESERVATIONS_PER_PAGE = 50
CALENDAR_STEP = timedelta(hours=12)
# Set when this user's own booking, cancellation, extension or release succeeds: their next booking page
# counts the shared calendar again instead of showing one from before their change.
CAPACITY_CHANGED = "capacity_changed"
EXTEND_END = "extend_end"  # the detail page's query parameter: the end a refused extension asked for
DATETIME_INPUT = forms.DateTimeInput(attrs={"type": "datetime-local", "step": 900}, format="%Y-%m-%dT%H:%M")


class SearchForm(forms.Form):
    gpu_model = forms.ModelChoiceField(queryset=GpuModel.objects.order_by("name"), to_field_name="name")
    gpus = forms.IntegerField(min_value=1, max_value=1_000_000, initial=8,
                              help_text="Whole nodes: a multiple of the node size.")
    start = forms.DateTimeField(required=False, widget=DATETIME_INPUT, help_text="UTC; empty means now.")
    end = forms.DateTimeField(widget=DATETIME_INPUT, help_text="UTC")
    region = forms.ModelChoiceField(queryset=Region.objects.order_by("code"), to_field_name="code", required=False,
                                    empty_label="any region")
    same_domain = forms.BooleanField(required=False, label="All nodes in one topology domain")


class ExtendForm(forms.Form):
    end = forms.DateTimeField(widget=DATETIME_INPUT, help_text="UTC")


def _tenant_or_none(request):
    tenant = request_tenant(request)
    if tenant is None:
        messages.error(request, "You act for no tenant: join a tenant to book.")
    return tenant


def _writer(request, tenant):
    if tenant is None:
        # Staff without a membership are ops: they act for no tenant here (the ops pages are theirs).
        raise PermissionDenied("You act for no tenant, so there is nothing of yours to change here.")
    if not member_can_write(user=request.user, tenant=tenant):
        raise PermissionDenied("Viewers cannot change anything; ask an owner of your tenant.")


def _form_errors(form) -> str:
    return "; ".join(f"{name}: {' '.join(errors)}" for name, errors in form.errors.items())


def _error_once(request, message: str) -> None:
    """An error message, unless the same one is already waiting: a refused booking goes back to its
    search, whose own check of the window would otherwise say the same thing a second time."""
    waiting = messages.get_messages(request)
    shown = any(queued.message == message for queued in waiting)
    waiting.used = False  # looking at the messages must not consume them
    if not shown:
        messages.error(request, message)


@login_required
def search(request):
    form = SearchForm(request.GET or None)
    result = None
    if form.is_bound and form.is_valid():
        data = form.cleaned_data
        try:
            now = timezone.now()
            start = policies.resolve_start(data["start"], now=now)
            policies.check_window(start=start, end=data["end"], enforce=not request.user.is_staff, now=now)
            result = selectors.availability_search(gpu_model=data["gpu_model"], gpus=data["gpus"], start=start,
                                                   end=data["end"], region=data["region"],
                                                   same_domain=data["same_domain"])
        except ServiceError as exc:
            _error_once(request, exc.message)
    elif form.is_bound:
        _error_once(request, _form_errors(form))
    # The capacity calendar: free GPUs per model over the next week, from the start of today (UTC).
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    calendar = selectors.capacity_calendar(start=today, end=today + timedelta(days=CALENDAR_DAYS),
                                           step=CALENDAR_STEP, fresh=request.session.pop(CAPACITY_CHANGED, False))
    # Booking in a region takes its cheapest fit, which is the region's first offer: that offer
    # gets the Book button.
    bookable = set()
    seen_regions = set()
    for index, offer in enumerate(result.offers if result else []):
        if offer.region not in seen_regions:
            seen_regions.add(offer.region)
            bookable.add(index)
    # A fresh key per rendered offer list (suffixed per region): a double-submitted Book button books once.
    return render(request, "web/reservations/search.html",
                  {"form": form, "result": result, "bookable": bookable, "idempotency_key": uuid.uuid4().hex,
                   "calendar": calendar.models, "calendar_as_of": calendar.as_of,
                   "calendar_columns": next(iter(calendar.models.values()), [])})


@login_required
@require_POST
def book(request):
    tenant = _tenant_or_none(request)
    form = SearchForm(request.POST)
    back = reverse("web:reservation-search") + "?" + urlencode(
        {name: request.POST.get(name, "") for name in SearchForm.base_fields})
    if tenant is None:
        return redirect("web:dashboard")
    if not form.is_valid():
        messages.error(request, _form_errors(form))
        return redirect(back)
    data = form.cleaned_data
    try:
        _writer(request, tenant)
        result = services.reservation_create(
            actor=Actor.for_user(request.user), tenant=tenant, gpu_model=data["gpu_model"].name, gpus=data["gpus"],
            start=data["start"], end=data["end"], region=data["region"].code if data["region"] else None,
            same_domain=data["same_domain"], idempotency_key=request.POST.get("idempotency_key", ""),
            enforce_policies=not request.user.is_staff,
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect(back)
    reservation = result.reservation
    request.session[CAPACITY_CHANGED] = True
    messages.success(request, f"Booked {reservation.gpus} GPUs for {reservation.total_price} {reservation.currency}.")
    return redirect("web:reservation-detail", reservation_id=reservation.pk)


@login_required
def reservation_list(request):
    tenant = request_tenant(request)
    status = request.GET.get("status", "")
    wanted = [status] if status in ReservationStatus.values else None
    reservations = selectors.reservation_list(tenant=tenant, status=wanted) if tenant else Reservation.objects.none()
    page = Paginator(reservations, RESERVATIONS_PER_PAGE).get_page(request.GET.get("page"))
    rows = [(r, selectors.reservation_node_names(r)) for r in page.object_list]
    return render(request, "web/reservations/list.html",
                  {"rows": rows, "page": page, "statuses": ReservationStatus.choices, "status": status})


@login_required
def reservation_detail(request, reservation_id):
    tenant = request_tenant(request)
    try:
        reservation = selectors.reservation_get(tenant=tenant, reservation_id=reservation_id)
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("web:reservation-list")
    return render(request, "web/reservations/detail.html", {
        "reservation": reservation, "nodes": selectors.reservation_node_names(reservation),
        "can_write": member_can_write(user=request.user, tenant=tenant),
        "events": reservation.events.order_by("due_at"),
        # After a refused extension the form keeps the end that was asked for.
        "extend_form": ExtendForm(initial={"end": request.GET.get(EXTEND_END) or reservation.ends_at}),
    })


@login_required
@require_POST
def reservation_action(request, reservation_id, action):
    tenant = request_tenant(request)
    actor = Actor.for_user(request.user)
    try:
        _writer(request, tenant)
        reservation = selectors.reservation_get(tenant=tenant, reservation_id=reservation_id)
        if action == "cancel":
            services.reservation_cancel(actor=actor, reservation=reservation)
            request.session[CAPACITY_CHANGED] = True
            messages.success(request, "Reservation cancelled; its nodes are free again.")
        elif action == "release":
            services.reservation_release(actor=actor, reservation=reservation)
            request.session[CAPACITY_CHANGED] = True
            messages.success(request, "Reservation released; the pool is being drained.")
        elif action == "extend":
            form = ExtendForm(request.POST)
            if not form.is_valid():
                raise InvalidInput(_form_errors(form))
            services.reservation_extend(actor=actor, reservation=reservation, end=form.cleaned_data["end"],
                                        enforce_policies=not request.user.is_staff)
            request.session[CAPACITY_CHANGED] = True
            messages.success(request, "Reservation extended.")
    except ServiceError as exc:
        messages.error(request, exc.message)
        if exc.http_status == 404 or tenant is None:
            return redirect("web:reservation-list")
        if action == "extend":
            return redirect(reverse("web:reservation-detail", kwargs={"reservation_id": reservation_id}) + "?"
                            + urlencode({EXTEND_END: request.POST.get("end", "")}))
    return redirect("web:reservation-detail", reservation_id=reservation_id)
