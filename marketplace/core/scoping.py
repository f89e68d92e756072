"""The one mechanism that scopes tenant-facing queries.

Every model a tenant may see carries a ``tenant`` foreign key (or a path to one) and uses
``TenantScopedQuerySet``. Tenant-facing selectors and API views start from ``for_tenant(...)``;
views never filter by tenant themselves.
"""

from django.db import models


class TenantScopedQuerySet(models.QuerySet):
    tenant_field = "tenant"

    def for_tenant(self, tenant) -> "TenantScopedQuerySet":
        if tenant is None:
            return self.none()
        return self.filter(**{self.tenant_field: tenant})
