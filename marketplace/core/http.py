"""The API's error shape, ``{"error": {"code", "message", "fields"}}``, for plain Django views and
middleware (DRF views answer through marketplace.api.errors)."""

from django.http import JsonResponse


def json_error(*, status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "fields": {}}}, status=status)
