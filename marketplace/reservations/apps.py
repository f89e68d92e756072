from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate


def _install_booking_function(sender, using: str = "default", **kwargs) -> None:
    # The function's name follows its text (see services._BOOK_FUNCTION_BODY): every migrate installs
    # the current one, as the schema it reads and writes is then in place.
    if connections[using].vendor == "postgresql":
        from marketplace.reservations.services import booking_function_install

        booking_function_install(using=using)


class ReservationsConfig(AppConfig):
    name = "marketplace.reservations"
    label = "reservations"

    def ready(self) -> None:
        post_migrate.connect(_install_booking_function, sender=self,
                             dispatch_uid="reservations.install_booking_function")
