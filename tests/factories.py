from decimal import Decimal

import factory
from django.contrib.auth import get_user_model

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
