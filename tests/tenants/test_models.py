"""Named constraints of tenants and memberships refuse bad rows with their own message."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from marketplace.tenants.models import Membership, Tenant
from tests.factories import MembershipFactory


def violates(instance, constraint_name: str) -> None:
    constraint = next(c for c in instance._meta.constraints if c.name == constraint_name)
    with pytest.raises(ValidationError) as caught:
        instance.full_clean()
    assert constraint.violation_error_message in str(caught.value)
    with pytest.raises(IntegrityError), transaction.atomic():
        instance.save()


@pytest.mark.django_db
class TestTenantConstraints:
    @pytest.mark.parametrize("slug", ["Upper", "-leading", "trailing-", "under_score"])
    def test_slug_is_a_dns_label(self, slug):
        violates(Tenant(slug=slug, name="x"), "tenant_slug_dns_label")

    def test_a_user_joins_a_tenant_once(self):
        membership = MembershipFactory()
        violates(Membership(user=membership.user, tenant=membership.tenant, role="viewer"),
                 "membership_user_tenant_unique")

    def test_good_slug_is_accepted(self):
        Tenant(slug="acme-ai-2", name="Acme").full_clean()
