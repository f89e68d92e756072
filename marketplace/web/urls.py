from django.contrib.auth import views as auth_views
from django.urls import path

from marketplace.web import booking_views, views

app_name = "web"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="web/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
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
