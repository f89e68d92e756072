from django.contrib import admin

from marketplace.core.admin import ReadOnlyAdminMixin
from marketplace.reservations.models import Allocation, Reservation, ReservationEvent


class AllocationInline(admin.TabularInline):
    model = Allocation
    extra = 0
    can_delete = False
    readonly_fields = ["node", "starts_at", "ends_at", "blocked_until", "state"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Read-only: reservations change only through services (state machine + audit)."""

    list_display = ["id", "tenant", "gpu_model", "gpus", "cluster", "starts_at", "ends_at", "status"]
    list_filter = ["status", "gpu_model", "cluster"]
    search_fields = ["id", "tenant__slug"]
    list_select_related = ["tenant", "gpu_model", "cluster"]
    inlines = [AllocationInline]


@admin.register(ReservationEvent)
class ReservationEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["reservation", "kind", "due_at", "status", "attempts", "last_error"]
    list_filter = ["kind", "status"]
