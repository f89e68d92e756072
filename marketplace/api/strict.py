"""Strict input: bodies must be JSON objects, are parsed before any action runs, and input
serializers refuse fields they do not know (a typo is an error, not a silent no-op)."""

from collections.abc import Mapping

from django.utils import dateparse, timezone
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class StrictInputMixin:
    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class AwareDateTimeField(serializers.DateTimeField):
    """A time that says which instant it is: a time without a UTC offset is refused, not read as
    UTC (a caller's local 14:00 read as 14:00 UTC books the wrong window)."""

    def to_internal_value(self, value):
        if isinstance(value, str):
            try:
                parsed = dateparse.parse_datetime(value.strip())
            except ValueError:
                parsed = None
            if parsed is not None and timezone.is_naive(parsed):
                raise serializers.ValidationError("Times must carry a timezone (e.g. 2026-12-01T09:00:00Z).",
                                                  code="naive")
        return super().to_internal_value(value)


class EmptyBodySerializer(StrictInputMixin, serializers.Serializer):
    """For actions that take no input: an empty body or ``{}``; anything else is refused."""


class ParseBodyFirstMixin:
    """Parses a write request's body before the action runs.

    DRF parses lazily, so an action that reads no body would accept a malformed one. Parsing after
    authentication and permissions (DRF's ``initial``) makes a bad body a 400 or 415 everywhere.
    """

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            request.data  # noqa: B018 - parsing is the point


class ObjectJSONParser(JSONParser):
    """JSON bodies of this API are objects; a bare list or string is refused up front."""

    def parse(self, stream, media_type=None, parser_context=None):
        data = super().parse(stream, media_type, parser_context)
        if not isinstance(data, Mapping):
            raise ParseError("The request body must be a JSON object.")
        return data
