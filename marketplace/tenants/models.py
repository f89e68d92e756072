from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from marketplace.core.scoping import TenantScopedQuerySet


class Tenant(models.Model):
    class BillingStatus(models.TextChoices):
        GOOD = "good", "In good standing"
        PAST_DUE = "past_due", "Past due"
        SUSPENDED = "suspended", "Suspended"

    slug = models.SlugField(max_length=40, unique=True, help_text="Used in Kubernetes names and labels.")
    name = models.CharField(max_length=200)
    billing_status = models.CharField(max_length=20, choices=BillingStatus, default=BillingStatus.GOOD)
    gpu_quota = models.PositiveIntegerField(
        default=64, help_text="Most GPUs this tenant may hold at any one time across all reservations."
    )
    kubernetes_group = models.CharField(
        max_length=200, blank=True, default="", help_text="Group bound to the tenant's Role in its namespaces."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.CheckConstraint(
                condition=Q(slug__regex=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"),
                name="tenant_slug_dns_label",
                violation_error_message="Tenant slug must be a DNS label: lower-case letters, digits and dashes.",
            ),
        ]

    def __str__(self) -> str:
        return self.slug

    @property
    def can_book(self) -> bool:
        return self.is_active and self.billing_status == self.BillingStatus.GOOD

    @property
    def group_name(self) -> str:
        return self.kubernetes_group or f"tenant:{self.slug}"


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner", "Owner"
        MEMBER = "member", "Member"
        VIEWER = "viewer", "Viewer"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="memberships")
    role = models.CharField(max_length=10, choices=Role, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["tenant", "user"]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "tenant"],
                name="membership_user_tenant_unique",
                violation_error_message="This user is already a member of this tenant.",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"

    @property
    def can_write(self) -> bool:
        return self.role in (self.Role.OWNER, self.Role.MEMBER)


class ApiToken(models.Model):
    """A per-user API token. Only its SHA-256 is stored; the secret is shown once at creation."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="api_tokens")
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="api_tokens")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, db_index=True, help_text="Shown so a user can tell tokens apart.")
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TenantScopedQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None
