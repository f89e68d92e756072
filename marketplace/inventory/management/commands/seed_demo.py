"""Build a realistic small demo fleet, tenants and users. Safe to run again: nothing is duplicated."""

from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from marketplace.core.services import Actor
from marketplace.inventory import services as inventory
from marketplace.inventory.models import MaintenanceWindow, Node
from marketplace.tenants import services as tenants
from marketplace.tenants.models import ApiToken, Tenant

ACTOR = Actor("system:seed_demo")

GPU_MODELS = [
    # name, memory GB, list price per GPU-hour (USD) in the cheapest region
    ("B200-SXM-180GB", 180, Decimal("5.9900")),
    ("H200-SXM-141GB", 141, Decimal("3.9900")),
    ("H100-SXM-80GB", 80, Decimal("2.9900")),
    ("A100-SXM-80GB", 80, Decimal("1.7900")),
    ("L40S-48GB", 48, Decimal("0.9900")),
]
REGIONS = [("us-east", "US East (Virginia)", Decimal("1.00")), ("eu-west", "EU West (Dublin)", Decimal("1.08")),
           ("ap-northeast", "Asia Pacific (Tokyo)", Decimal("1.12"))]
# cluster, region, {model: (islands, nodes per island)}
CLUSTERS = [
    ("use-alpha", "us-east", {"H100-SXM-80GB": (3, 4), "B200-SXM-180GB": (1, 3), "L40S-48GB": (1, 3)}),
    ("use-beta", "us-east", {"H200-SXM-141GB": (2, 4), "A100-SXM-80GB": (2, 3)}),
    ("euw-gamma", "eu-west", {"H100-SXM-80GB": (2, 4), "A100-SXM-80GB": (1, 4)}),
    ("apne-delta", "ap-northeast", {"H200-SXM-141GB": (1, 3), "L40S-48GB": (1, 2)}),
]
TENANTS = [
    ("acme-ai", "Acme AI Research", 256, [("alice", "owner"), ("bob", "member"), ("carol", "viewer")]),
    ("nimbus-labs", "Nimbus Labs", 128, [("dave", "owner"), ("erin", "member")]),
    ("quanta", "Quanta Models", 64, [("frank", "owner")]),
]
DEMO_PASSWORD = "demo-password-123"
# Planned maintenance ops see on the inventory page: (node, days from now, hours, reason).
MAINTENANCE = [
    ("use-alpha-h100-ib0-01", 2, 6, "Demo: InfiniBand cable replacement"),
    ("euw-gamma-a100-ib0-02", 5, 12, "Demo: GPU firmware upgrade"),
]


class Command(BaseCommand):
    help = "Create the demo fleet, tenants, users and an API token (idempotent)."

    def handle(self, *args, **options):
        if settings.DJANGO_ENV == "production":
            # It creates a superuser with a published password.
            raise CommandError("seed_demo creates demo users with a known password: it does not run in production "
                               "(DJANGO_ENV=production). Use DJANGO_ENV=development.")
        with transaction.atomic():
            self._fleet()
            self._maintenance()
            token_line = self._people()
        gpus = sum(Node.objects.values_list("gpu_count", flat=True))
        self.stdout.write(self.style.SUCCESS(f"Demo fleet: {Node.objects.count()} nodes, {gpus} GPUs."))
        self.stdout.write(f"Ops login:    ops / {DEMO_PASSWORD}   (staff, Django admin at /admin/)")
        for slug, _, _, members in TENANTS:
            names = ", ".join(f"{user} ({role})" for user, role in members)
            self.stdout.write(f"Tenant {slug}: {names}; password {DEMO_PASSWORD}")
        self.stdout.write(token_line)

    def _fleet(self) -> None:
        models = {name: inventory.gpu_model_ensure(name=name, vendor="NVIDIA", memory_gb=mem) for name, mem, _ in GPU_MODELS}
        regions = {code: inventory.region_ensure(code=code, name=name) for code, name, _ in REGIONS}
        for name, _, base in GPU_MODELS:
            for code, _, factor in REGIONS:
                inventory.gpu_price_set(actor=ACTOR, gpu_model=models[name], region=regions[code],
                                        price=(base * factor).quantize(Decimal("0.0001")))
        for cluster_name, region_code, layout in CLUSTERS:
            cluster = inventory.cluster_ensure(actor=ACTOR, name=cluster_name, region=regions[region_code])
            for model_name, (islands, per_island) in layout.items():
                short = model_name.split("-")[0].lower()
                for island in range(islands):
                    for index in range(per_island):
                        node_name = f"{cluster_name}-{short}-ib{island}-{index:02d}"
                        # Every eleventh node is in maintenance, so ops and tenants see it excluded.
                        in_maintenance = (island * per_island + index) % 11 == 10
                        if Node.objects.filter(cluster=cluster, name=node_name).exists():
                            continue
                        inventory.node_create(
                            actor=ACTOR, cluster=cluster, name=node_name, gpu_model=models[model_name],
                            gpu_count=8, cpu_cores=224, memory_gb=2048,
                            topology_domain=f"{cluster_name}-{short}-ib{island}",
                            status=Node.Status.MAINTENANCE if in_maintenance else Node.Status.AVAILABLE,
                            # No cluster to observe in the demo: the plan-only fleet is taken as healthy.
                            health=Node.Health.HEALTHY,
                        )

    def _maintenance(self) -> None:
        start_of_day = timezone.now().replace(hour=8, minute=0, second=0, microsecond=0)
        for node_name, days, hours, reason in MAINTENANCE:
            node = Node.objects.get(name=node_name)
            if MaintenanceWindow.objects.filter(node=node, reason=reason, cancelled_at__isnull=True).exists():
                continue
            starts_at = start_of_day + timedelta(days=days)
            inventory.maintenance_window_create(actor=ACTOR, node=node, starts_at=starts_at,
                                                ends_at=starts_at + timedelta(hours=hours), reason=reason)

    def _people(self) -> str:
        User = get_user_model()
        if not User.objects.filter(username="ops").exists():
            User.objects.create_superuser("ops", "ops@example.com", DEMO_PASSWORD)
        first_owner = None
        for slug, name, quota, members in TENANTS:
            tenant = Tenant.objects.filter(slug=slug).first() or tenants.tenant_create(
                actor=ACTOR, slug=slug, name=name, gpu_quota=quota
            )
            for username, role in members:
                user = User.objects.filter(username=username).first() or tenants.user_create(
                    username=username, password=DEMO_PASSWORD, email=f"{username}@{slug}.example"
                )
                tenants.membership_add(actor=ACTOR, tenant=tenant, user=user, role=role)
                if first_owner is None:
                    first_owner = (user, tenant)
        user, tenant = first_owner
        # A token's secret is only known when it is issued, so the demo issues a fresh one each run
        # and revokes the previous demo token: the printed token always works.
        for old in ApiToken.objects.filter(user=user, tenant=tenant, name="demo", revoked_at__isnull=True):
            tenants.api_token_revoke(actor=ACTOR, token_id=old.pk, tenant=tenant)
        issued = tenants.api_token_issue(actor=ACTOR, user=user, tenant=tenant, name="demo")
        return f"API token for {user.username}@{tenant.slug}: {issued.raw}"
