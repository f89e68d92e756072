from rest_framework import permissions

from marketplace.tenants.selectors import membership_for, request_tenant


class IsStaff(permissions.BasePermission):
    message = "Only operations staff may do this."

    def has_permission(self, request, view):
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)


class IsStaffOrReadOnly(permissions.BasePermission):
    message = "Only operations staff may change this."

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        return request.method in permissions.SAFE_METHODS or request.user.is_staff


class HasTenant(permissions.BasePermission):
    """The caller acts for a tenant; writes need the owner or member role (viewers read only)."""

    message = "You act for no tenant: use a tenant API token or join a tenant."

    def has_permission(self, request, view):
        if not (request.user and request.user.is_authenticated):
            return False
        tenant = request_tenant(request)
        if tenant is None:
            return False
        if request.method in permissions.SAFE_METHODS:
            return True
        membership = membership_for(user=request.user, tenant=tenant)
        if membership is None or not membership.can_write:
            self.message = "Viewers cannot change anything; ask an owner of your tenant."
            return False
        return True
