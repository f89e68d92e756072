from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.web import views
from marketplace.web import scheduler_views

app_name = "web"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="web/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("pools/<uuid:reservation_id>/", scheduler_views.pool_detail, name="pool-detail"),
    path("ops/scheduler/", scheduler_views.scheduler_health, name="scheduler-health"),
    path("ops/scheduler/<uuid:reservation_id>/retry/", scheduler_views.scheduler_retry, name="scheduler-retry"),
]
