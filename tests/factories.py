from datetime import timedelta
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, Node, Region
from marketplace.tenants.models import Membership, Tenant


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.test")
    password = factory.django.Password("correct-horse-battery")


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.LazyAttribute(lambda o: o.slug.title())
    gpu_quota = 1024


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Membership

    user = factory.SubFactory(UserFactory)
    tenant = factory.SubFactory(TenantFactory)
    role = Membership.Role.MEMBER


class RegionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Region
        django_get_or_create = ("code",)

    code = "us-east"
    name = "US East"


class GpuModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GpuModel
        django_get_or_create = ("name",)

    name = "H100-SXM-80GB"
    memory_gb = 80
    gpus_per_node = 8


class GpuPriceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = GpuPrice
        django_get_or_create = ("gpu_model", "region")

    gpu_model = factory.SubFactory(GpuModelFactory)
    region = factory.SubFactory(RegionFactory)
    currency = "USD"
    price_per_gpu_hour = Decimal("2.5000")


class ClusterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Cluster
        django_get_or_create = ("name",)

    name = factory.Sequence(lambda n: f"cluster-{n}")
    region = factory.SubFactory(RegionFactory)


class NodeFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Node

    name = factory.Sequence(lambda n: f"gpu-node-{n:04d}")
    cluster = factory.SubFactory(ClusterFactory)
    gpu_model = factory.SubFactory(GpuModelFactory)
    gpu_count = 8
    cpu_cores = 224
    memory_gb = 2048
    topology_domain = "ib-0"
    status = Node.Status.AVAILABLE
    health = Node.Health.HEALTHY


class ReservationFactory(factory.django.DjangoModelFactory):
    """A confirmed reservation row (the booking service is the way to book; this only sets up data)."""

    class Meta:
        model = "reservations.Reservation"

    tenant = factory.SubFactory(TenantFactory)
    created_by = factory.SubFactory(UserFactory)
    gpu_model = factory.SubFactory(GpuModelFactory)
    cluster = factory.SubFactory(ClusterFactory)
    gpus = 8
    starts_at = factory.LazyFunction(lambda: timezone.now() + timedelta(days=1))
    ends_at = factory.LazyAttribute(lambda o: o.starts_at + timedelta(hours=4))
    status = "confirmed"
    currency = "USD"
    unit_price = Decimal("2.5000")
    total_price = Decimal("80.00")


class AllocationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = "reservations.Allocation"

    reservation = factory.SubFactory(ReservationFactory)
    node = factory.SubFactory(NodeFactory)
    starts_at = factory.LazyAttribute(lambda o: o.reservation.starts_at)
    ends_at = factory.LazyAttribute(lambda o: o.reservation.ends_at)
    blocked_until = factory.LazyAttribute(lambda o: o.ends_at + timedelta(minutes=30))
