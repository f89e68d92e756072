from django.contrib import admin
from django.urls import include, path

from marketplace.core import views as core_views

urlpatterns = [
    path("healthz", core_views.healthz, name="healthz"),
    path("readyz", core_views.readyz, name="readyz"),
    path("metrics", core_views.metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/", include("marketplace.api.urls")),
    path("", include("marketplace.web.urls")),
]

# API clients get the JSON error shape for unexpected failures too; pages get the HTML page.
handler500 = "marketplace.api.errors.server_error_view"
