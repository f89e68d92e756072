"""Every API error has one shape: ``{"error": {"code", "message", "fields"}}``."""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DataError, IntegrityError
from django.http import Http404
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from marketplace.core.exceptions import ServiceError
from marketplace.core.http import json_error
from marketplace.metrics import API_ERRORS


def error_response(*, http_status: int, code: str, message: str, fields: dict | None = None, headers=None) -> Response:
    API_ERRORS.labels(code=code).inc()
    return Response(
        {"error": {"code": code, "message": message, "fields": fields or {}}}, status=http_status, headers=headers
    )


def _flatten(detail) -> dict:
    if isinstance(detail, dict):
        return {key: [str(item) for item in (value if isinstance(value, list) else [value])] for key, value in detail.items()}
    if isinstance(detail, list):
        return {"non_field_errors": [str(item) for item in detail]}
    return {}


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        return error_response(http_status=exc.http_status, code=exc.code, message=exc.message, fields=exc.fields)
    if isinstance(exc, DjangoValidationError):
        fields = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        return error_response(http_status=400, code="invalid", message="; ".join(exc.messages), fields=fields)
    if isinstance(exc, IntegrityError):
        # A constraint caught what validation did not: a client error, not a server one.
        return error_response(http_status=409, code="conflict", message="The change conflicts with existing data.")
    if isinstance(exc, DataError):
        # The database refused a value that validation let through; PostgreSQL refuses NUL in text
        # even in a lookup. The statement failed, so nothing of it was written.
        return error_response(http_status=400, code="invalid",
                              message="A value in the request cannot be stored or looked up: text with a NUL "
                                      "(\\u0000) character, or a number out of range.")
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        fields = _flatten(exc.detail)
        first = next(iter(fields.items()), None)
        message = f"{first[0]}: {first[1][0]}" if first else "Invalid input."
        if first and first[0] == "non_field_errors":
            message = first[1][0]
        return error_response(http_status=response.status_code, code="invalid", message=message, fields=fields,
                              headers=_headers(response))
    code = getattr(exc, "default_code", "error")
    detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
    message = str(detail) if not isinstance(detail, (dict, list)) else "Request failed."
    return error_response(http_status=response.status_code, code=str(code), message=message, headers=_headers(response))


def _headers(response: Response) -> dict:
    return {key: value for key, value in response.items() if key in ("WWW-Authenticate", "Retry-After", "Allow")}


@csrf_exempt  # it changes nothing, and API clients with a token hold no CSRF cookie to show
def not_found_view(request, exception=None):
    return json_error(status=404, code="not_found", message="No such endpoint.")


def server_error_view(request):
    from django.views.defaults import server_error

    if not request.path.startswith("/api/"):
        return server_error(request)
    return json_error(status=status.HTTP_500_INTERNAL_SERVER_ERROR, code="server_error",
                      message="Internal error; it has been logged.")
