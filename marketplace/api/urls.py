from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from marketplace.api import accounts, catalogue, reservations
from marketplace.api import pools as pools_api
from marketplace.api.errors import not_found_view

router = DefaultRouter(trailing_slash=True)
catalogue.register(router)
accounts.register(router)
pools_api.register(router)
reservations.register(router)

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("v1/availability/", reservations.AvailabilityView.as_view(), name="availability"),
    path("v1/capacity/", reservations.CapacityView.as_view(), name="capacity"),
    path("v1/", include(router.urls)),
    # Last: any other /api/ URL is a JSON 404 in the one error shape, not an HTML page.
    re_path(r"^", not_found_view),
]
