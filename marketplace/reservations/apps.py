from django.apps import AppConfig


class ReservationsConfig(AppConfig):
    name = "marketplace.reservations"
    label = "reservations"
