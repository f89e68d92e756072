"""Request checks that apply to every page, the API and the admin alike."""

from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from marketplace.core.http import json_error

NUL_MESSAGE = "The query string contains a NUL (\\u0000) character."


class RejectNulInQueryMiddleware:
    """A query string with a NUL character is a 400 before any view runs.

    PostgreSQL refuses NUL in text, even in a comparison, so a raw query value that reaches a
    filter (a list filter, the admin's search) would fail as a DataError: a 500. Forms and
    serializers refuse NUL themselves; query strings are read raw in many places.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            if request.path.startswith("/api/"):
                return json_error(status=400, code="invalid", message=NUL_MESSAGE)
            return HttpResponseBadRequest(NUL_MESSAGE, content_type="text/plain; charset=utf-8")
        return self.get_response(request)
