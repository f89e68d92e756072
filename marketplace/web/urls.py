from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.web import account, ops, scheduler_views, views

app_name = "web"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="web/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("pools/<uuid:reservation_id>/", scheduler_views.pool_detail, name="pool-detail"),
    path("ops/scheduler/", scheduler_views.scheduler_health, name="scheduler-health"),
    path("ops/scheduler/<uuid:reservation_id>/retry/", scheduler_views.scheduler_retry, name="scheduler-retry"),
    path("tenant/switch/", views.tenant_switch, name="tenant-switch"),
    path("account/tokens/", account.tokens, name="tokens"),
    path("account/tokens/<int:token_id>/revoke/", account.token_revoke, name="token-revoke"),
    path("account/members/", account.members, name="members"),
    path("account/members/<int:membership_id>/role/", account.member_role, name="member-role"),
    path("ops/fleet/", ops.fleet, name="ops-fleet"),
    path("ops/inventory/", ops.inventory, name="ops-inventory"),
    path("ops/inventory/node-status/", ops.node_status, name="ops-node-status"),
    path("ops/maintenance/<int:window_id>/cancel/", ops.window_cancel, name="ops-window-cancel"),
    path("ops/audit/", ops.audit_log, name="ops-audit"),
]
