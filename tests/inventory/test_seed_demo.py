"""``manage.py seed_demo`` builds the demo fleet, can run again without duplicating, and prints logins."""

import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from marketplace.inventory.models import Cluster, GpuModel, MaintenanceWindow, Node, Region
from marketplace.tenants.models import ApiToken, Membership, Tenant


def seed() -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def counts() -> dict:
    return {model.__name__: model.objects.count()
            for model in [Region, Cluster, GpuModel, Node, MaintenanceWindow, Tenant, Membership]}


@pytest.mark.django_db
def test_seed_builds_a_realistic_fleet_and_is_idempotent():
    # when the demo is seeded twice
    first_output = seed()
    first = counts()
    second_output = seed()
    # then nothing is duplicated
    assert counts() == first
    # and the fleet has several regions and clusters, nodes of 8 of each headline model, some in maintenance
    assert first["Region"] >= 3 and first["Cluster"] >= 4
    assert set(GpuModel.objects.values_list("name", flat=True)) >= {
        "H100-SXM-80GB", "H200-SXM-141GB", "A100-SXM-80GB", "L40S-48GB", "B200-SXM-180GB"}
    assert set(Node.objects.values_list("gpu_count", flat=True)) == {8}
    assert 200 <= sum(Node.objects.values_list("gpu_count", flat=True)) <= 1000
    assert Node.objects.filter(status=Node.Status.MAINTENANCE).exists()
    assert MaintenanceWindow.objects.filter(cancelled_at__isnull=True).count() >= 1
    # and each run prints the logins and a token that works; the previous demo token is revoked
    for output in (first_output, second_output):
        assert "Ops login:" in output and "alice (owner)" in output
    first_token = re.search(r"gpm_\S+", first_output).group(0)
    second_token = re.search(r"gpm_\S+", second_output).group(0)
    api = Client()
    assert api.get("/api/v1/gpu-models/", HTTP_AUTHORIZATION=f"Bearer {second_token}").status_code == 200
    assert api.get("/api/v1/gpu-models/", HTTP_AUTHORIZATION=f"Bearer {first_token}").status_code == 401
    assert ApiToken.objects.filter(name="demo", revoked_at__isnull=True).count() == 1


@pytest.mark.django_db
def test_seed_refuses_to_run_in_production(settings):
    # given a production process
    from django.contrib.auth import get_user_model
    from django.core.management.base import CommandError

    settings.DJANGO_ENV = "production"
    # when the demo is seeded, then it refuses, and no user with the published password exists
    with pytest.raises(CommandError, match="does not run in production"):
        call_command("seed_demo", stdout=StringIO())
    assert not get_user_model().objects.filter(username="ops").exists() and not Node.objects.exists()
