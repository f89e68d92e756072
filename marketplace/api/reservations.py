"""Booking API: availability search, the capacity calendar, and the caller's reservations."""

import re
from datetime import timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.utils import dateparse, timezone
from django.utils.duration import duration_iso_string
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.scoping import TenantScopedViewSet
from marketplace.api.strict import AwareDateTimeField, EmptyBodySerializer, StrictInputMixin
from marketplace.core.exceptions import InvalidInput
from marketplace.core.services import Actor
from marketplace.reservations import policies, selectors, services
from marketplace.reservations.models import Reservation
from marketplace.reservations.status import ReservationStatus

SPAN_UNITS = {"m": 60, "h": 3600, "d": 86400}


SHORT_SPAN = re.compile(r"([0-9]+)([mhd])")


def parse_span(value: str, *, name: str) -> timedelta:
    """``15m``, ``2h``, ``7d`` or ISO 8601 (``P7D``, ``PT1H``), positive and at most policies.FARTHEST."""
    value = (value or "").strip()
    too_long = InvalidInput(f"{name} is at most {policies.FARTHEST.days}d.", fields={name: ["too long"]})
    try:
        if short := SHORT_SPAN.fullmatch(value):
            if len(short[1].lstrip("0")) > 12:
                raise too_long  # before timedelta(), which would take a very long number's seconds
            span = timedelta(seconds=int(short[1]) * SPAN_UNITS[short[2]])
        else:
            span = dateparse.parse_duration(value)
    except OverflowError:
        raise too_long from None
    if span is None or span <= timedelta(0):
        raise InvalidInput(f"{name} must be a positive duration such as 15m, 2h, 7d or PT1H.",
                           fields={name: ["not a positive duration"]})
    if span > policies.FARTHEST:
        raise too_long
    return span


def parse_horizon(text: str, *, start):
    """The latest start ``earliest=true`` may propose: a UTC-aware time, or a duration after start."""
    if not text:
        return start + settings.MARKETPLACE["SEARCH_HORIZON"]
    try:
        moment = dateparse.parse_datetime(text)
    except ValueError:
        moment = None
    if moment is not None:
        if timezone.is_naive(moment):
            raise InvalidInput("horizon must carry a timezone (e.g. Z).", fields={"horizon": ["naive time"]})
        return moment.astimezone(dt_timezone.utc)  # UTC, as every time the engine states
    return start + parse_span(text, name="horizon")


class SpanField(serializers.CharField):
    """A duration in, a ``timedelta`` out; its default must be a ``timedelta`` too, since DRF hands
    an omitted field's default to the view as it is, without parsing it."""

    def to_internal_value(self, data):
        return parse_span(super().to_internal_value(data), name=self.field_name)

    def to_representation(self, value):
        # The shortest spelling parse_span reads back: 1h, 7d, 90m; ISO 8601 for anything finer.
        seconds = value.total_seconds()
        for unit, size in sorted(SPAN_UNITS.items(), key=lambda item: -item[1]):
            if seconds.is_integer() and seconds % size == 0:
                return f"{int(seconds) // size}{unit}"
        return duration_iso_string(value)


class WindowQuery(serializers.Serializer):
    gpu_model = serializers.CharField(max_length=60)
    gpus = serializers.IntegerField(min_value=1, max_value=1_000_000)
    start = AwareDateTimeField(required=False, default=None)
    end = AwareDateTimeField()
    region = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")
    same_domain = serializers.BooleanField(required=False, default=False)


class BookingBody(StrictInputMixin, WindowQuery):
    """A booking's body: a misspelt field (``strat``, ``regoin``) is refused, never booked as if absent."""


class AvailabilityQuery(WindowQuery):
    earliest = serializers.BooleanField(required=False, default=False)
    horizon = serializers.CharField(required=False, allow_blank=True, default="")


class CapacityQuery(serializers.Serializer):
    gpu_model = serializers.CharField(max_length=60, required=False, allow_blank=True, default="")
    region = serializers.CharField(max_length=40, required=False, allow_blank=True, default="")
    start = AwareDateTimeField()
    end = AwareDateTimeField()
    step = SpanField(required=False, default=timedelta(hours=1))


class OfferSerializer(serializers.Serializer):
    region = serializers.CharField()
    cluster = serializers.CharField()
    nodes = serializers.IntegerField()
    gpus = serializers.IntegerField()
    same_domain = serializers.BooleanField()
    domains = serializers.ListField(child=serializers.CharField())
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=4)
    total_price = serializers.DecimalField(max_digits=16, decimal_places=2)
    currency = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()


class AvailabilitySerializer(serializers.Serializer):
    gpu_model = serializers.CharField()
    gpus = serializers.IntegerField()
    nodes = serializers.IntegerField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    offers = OfferSerializer(many=True)
    reason = serializers.JSONField(allow_null=True, help_text='{"code", "message"} when no offer fits')


class CapacitySerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    step_seconds = serializers.IntegerField()
    as_of = serializers.DateTimeField(help_text="When the counts were computed: a calendar is shared for up to "
                                                "MARKETPLACE_CAPACITY_CACHE_SECONDS; a search is always exact")
    gpu_models = serializers.JSONField(help_text="{model: [{start, end, total_gpus, free_gpus}, ...]}")


class ReservationSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    status_reason = serializers.CharField()
    nodes = serializers.SerializerMethodField()
    cluster = serializers.CharField(source="cluster.name")
    region = serializers.CharField(source="cluster.region.code")
    gpu_model = serializers.CharField(source="gpu_model.name")
    gpus = serializers.IntegerField()
    same_domain = serializers.BooleanField()
    start = serializers.DateTimeField(source="starts_at")
    end = serializers.DateTimeField(source="ends_at")
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=4)
    total_price = serializers.DecimalField(max_digits=16, decimal_places=2)
    currency = serializers.CharField()
    readiness = serializers.JSONField()
    ready_at = serializers.DateTimeField()
    released_at = serializers.DateTimeField()
    created_at = serializers.DateTimeField()

    def get_nodes(self, reservation) -> list[str]:
        return selectors.reservation_node_names(reservation)


class ExtendBody(StrictInputMixin, serializers.Serializer):
    end = AwareDateTimeField()


class ListQuery(serializers.Serializer):
    status = serializers.CharField(required=False, allow_blank=True, default="")
    start = AwareDateTimeField(required=False, default=None)
    end = AwareDateTimeField(required=False, default=None)

    def validate_status(self, value):
        wanted = [part for part in value.split(",") if part]
        unknown = set(wanted) - set(ReservationStatus.values)
        if unknown:
            raise serializers.ValidationError(f"unknown status {', '.join(sorted(unknown))}; "
                                              f"one of {', '.join(ReservationStatus.values)}")
        return wanted


def _valid(serializer_class, data) -> dict:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def _enforce(request) -> bool:
    # Ops (staff) may book outside the tenant policies.
    return not request.user.is_staff


class AvailabilityView(APIView):
    """Offers for gpus of a GPU model over [start, end), or the earliest window that fits."""

    permission_classes = [IsAuthenticated]

    @extend_schema(parameters=[AvailabilityQuery], responses=AvailabilitySerializer)
    def get(self, request):
        query = _valid(AvailabilityQuery, request.query_params)
        model = selectors.gpu_model_by_name(query["gpu_model"])
        region = selectors.region_by_code(query["region"])
        now = timezone.now()
        start = policies.resolve_start(query["start"], now=now)
        policies.check_window(start=start, end=query["end"], enforce=_enforce(request), now=now)
        window = dict(gpu_model=model, gpus=query["gpus"], start=start, end=query["end"], region=region,
                      same_domain=query["same_domain"])
        if query["earliest"]:
            horizon = min(parse_horizon(query["horizon"], start=start), now + settings.MARKETPLACE["MAX_LEAD_TIME"])
            found = selectors.availability_earliest(horizon=horizon, **window)
        else:
            found = selectors.availability_search(**window)
        return Response({
            "gpu_model": found.gpu_model, "gpus": found.gpus, "nodes": found.nodes,
            "start": serializers.DateTimeField().to_representation(found.start),
            "end": serializers.DateTimeField().to_representation(found.end),
            "offers": OfferSerializer(found.offers, many=True).data, "reason": found.reason,
        })


class CapacityView(APIView):
    """Free GPUs per GPU model in buckets of ``step`` over [start, end): for the booking calendar."""

    permission_classes = [IsAuthenticated]

    @extend_schema(parameters=[CapacityQuery], responses=CapacitySerializer)
    def get(self, request):
        query = _valid(CapacityQuery, request.query_params)
        if query["end"] <= query["start"]:
            raise InvalidInput("end must be after start.", fields={"end": ["must be after start"]})
        if query["step"] % timedelta(seconds=1):
            raise InvalidInput("step is a whole number of seconds.", fields={"step": ["fraction of a second"]})
        now = timezone.now()
        if not now - policies.FARTHEST <= query["start"] < query["end"] <= now + policies.FARTHEST:
            raise InvalidInput(f"The calendar reaches at most {policies.FARTHEST.days} days either side of now.",
                               fields={"start": ["out of range"], "end": ["out of range"]})
        model = selectors.gpu_model_by_name(query["gpu_model"]) if query["gpu_model"] else None
        calendar = selectors.capacity_calendar(start=query["start"], end=query["end"], step=query["step"],
                                               gpu_model=model, region=selectors.region_by_code(query["region"]))
        as_time = serializers.DateTimeField().to_representation
        return Response({
            "start": as_time(query["start"]), "end": as_time(query["end"]),
            "step_seconds": int(query["step"].total_seconds()), "as_of": as_time(calendar.as_of),
            "gpu_models": {
                name: [{"start": as_time(b.start), "end": as_time(b.end), "total_gpus": b.total_gpus,
                        "free_gpus": b.free_gpus} for b in buckets]
                for name, buckets in calendar.models.items()
            },
        })


class ReservationViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Your tenant's reservations: book, list, cancel, extend, release early."""

    serializer_class = ReservationSerializer
    scoped_model = Reservation

    def tenant_queryset(self, tenant):
        if self.action != "list":
            return selectors.reservation_list(tenant=tenant)
        query = _valid(ListQuery, self.request.query_params)
        return selectors.reservation_list(tenant=tenant, status=query["status"], start=query["start"], end=query["end"])

    def _show(self, reservation, http_status=status.HTTP_200_OK) -> Response:
        fresh = selectors.reservation_get(tenant=self.tenant, reservation_id=reservation.pk)
        return Response(ReservationSerializer(fresh).data, status=http_status)

    @extend_schema(request=BookingBody, responses={201: ReservationSerializer, 200: ReservationSerializer})
    def create(self, request):
        body = _valid(BookingBody, request.data)
        result = services.reservation_create(
            actor=Actor.for_user(request.user), tenant=self.tenant, gpu_model=body["gpu_model"], gpus=body["gpus"],
            start=body["start"], end=body["end"], region=body["region"] or None, same_domain=body["same_domain"],
            idempotency_key=request.headers.get("Idempotency-Key", ""), enforce_policies=_enforce(request),
        )
        response = self._show(result.reservation, status.HTTP_201_CREATED if result.created else status.HTTP_200_OK)
        if not result.created:
            response["Idempotent-Replayed"] = "true"
        return response

    @extend_schema(request=None, responses=ReservationSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        reservation = self.get_object()
        _valid(EmptyBodySerializer, request.data)
        reservation = services.reservation_cancel(actor=Actor.for_user(request.user), reservation=reservation)
        return self._show(reservation)

    @extend_schema(request=ExtendBody, responses=ReservationSerializer)
    @action(detail=True, methods=["post"])
    def extend(self, request, pk=None):
        reservation = self.get_object()
        body = _valid(ExtendBody, request.data)
        reservation = services.reservation_extend(actor=Actor.for_user(request.user), reservation=reservation,
                                                  end=body["end"], enforce_policies=_enforce(request))
        return self._show(reservation)

    @extend_schema(request=None, responses=ReservationSerializer)
    @action(detail=True, methods=["post"])
    def release(self, request, pk=None):
        reservation = self.get_object()
        _valid(EmptyBodySerializer, request.data)
        reservation = services.reservation_release(actor=Actor.for_user(request.user), reservation=reservation)
        return self._show(reservation)


def register(router) -> None:
    router.register("reservations", ReservationViewSet, basename="reservation")


