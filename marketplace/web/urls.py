from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.web import account, booking_views, ops, scheduler_views, views

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
    path("reservations/", booking_views.reservation_list, name="reservation-list"),
    path("reservations/search/", booking_views.search, name="reservation-search"),
    path("reservations/book/", booking_views.book, name="reservation-book"),
    path("reservations/<uuid:reservation_id>/", booking_views.reservation_detail, name="reservation-detail"),
    path("reservations/<uuid:reservation_id>/cancel/", booking_views.reservation_action, {"action": "cancel"},
         name="reservation-cancel"),
    path("reservations/<uuid:reservation_id>/extend/", booking_views.reservation_action, {"action": "extend"},
         name="reservation-extend"),
    path("reservations/<uuid:reservation_id>/release/", booking_views.reservation_action, {"action": "release"},
         name="reservation-release"),
]
