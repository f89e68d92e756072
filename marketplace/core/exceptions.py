"""Errors raised by services and selectors.

The API turns each into ``{"error": {"code", "message", "fields"}}`` with its HTTP status; the web
UI shows the message. Services raise these, never DRF or HTTP exceptions.
"""

from typing import Any


class ServiceError(Exception):
    http_status = 400
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.fields = fields or {}


class InvalidInput(ServiceError):
    http_status = 400
    code = "invalid"


class NotFound(ServiceError):
    http_status = 404
    code = "not_found"


class PermissionDenied(ServiceError):
    http_status = 403
    code = "permission_denied"


class Conflict(ServiceError):
    http_status = 409
    code = "conflict"


class PolicyViolation(ServiceError):
    """The request is well-formed but a marketplace policy forbids it."""

    http_status = 422
    code = "policy_violation"
