from rest_framework import viewsets

from marketplace.api.permissions import HasTenant
from marketplace.api.strict import ParseBodyFirstMixin
from marketplace.tenants.selectors import request_tenant


class TenantScopedMixin(ParseBodyFirstMixin):
    """Tenant-facing views list and fetch only the caller's tenant's rows.

    Subclasses name a ``scoped_model`` (whose manager is a TenantScopedQuerySet) or override
    ``tenant_queryset(tenant)``; they never filter by tenant themselves. Another tenant's object
    is therefore a 404, not a 403: it is invisible.
    """

    permission_classes = [HasTenant]
    scoped_model = None

    @property
    def tenant(self):
        return request_tenant(self.request)

    def tenant_queryset(self, tenant):
        return self.scoped_model.objects.for_tenant(tenant)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            # Schema generation runs without a request user: describe the model, read nothing.
            return self.scoped_model.objects.none()
        return self.tenant_queryset(self.tenant)


class TenantScopedViewSet(TenantScopedMixin, viewsets.GenericViewSet):
    pass
