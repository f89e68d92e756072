from decimal import Decimal

from django.db import transaction

from marketplace.core.services import Actor, audit_record, snapshot
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, Node, Region

NODE_AUDIT_FIELDS = ["name", "cluster", "gpu_model", "gpu_count", "topology_domain", "status"]


def region_ensure(*, code: str, name: str) -> Region:
    region, _ = Region.objects.get_or_create(code=code, defaults={"name": name})
    return region


def gpu_model_ensure(*, name: str, vendor: str, memory_gb: int, gpus_per_node: int = 8) -> GpuModel:
    model, _ = GpuModel.objects.get_or_create(
        name=name, defaults={"vendor": vendor, "memory_gb": memory_gb, "gpus_per_node": gpus_per_node}
    )
    return model


def gpu_price_set(*, actor: Actor, gpu_model: GpuModel, region: Region, price: Decimal, currency: str = "USD") -> GpuPrice:
    with transaction.atomic():
        existing = GpuPrice.objects.select_for_update().filter(gpu_model=gpu_model, region=region).first()
        before = snapshot(existing, ["price_per_gpu_hour", "currency"]) if existing else None
        price_row, _ = GpuPrice.objects.update_or_create(
            gpu_model=gpu_model, region=region, defaults={"price_per_gpu_hour": price, "currency": currency}
        )
        after = snapshot(price_row, ["price_per_gpu_hour", "currency"])
        if before != after:
            audit_record(actor=actor, action="gpu_price.set", obj=price_row, before=before, after=after)
    return price_row


def cluster_ensure(*, actor: Actor, name: str, region: Region, connection: str = Cluster.Connection.PLAN,
                   kubeconfig_path: str = "", kube_context: str = "") -> Cluster:
    with transaction.atomic():
        cluster, created = Cluster.objects.get_or_create(
            name=name,
            defaults={"region": region, "connection": connection, "kubeconfig_path": kubeconfig_path,
                      "kube_context": kube_context},
        )
        if created:
            audit_record(actor=actor, action="cluster.create", obj=cluster,
                         after=snapshot(cluster, ["name", "region", "connection"]))
    return cluster


def node_set_status(*, actor: Actor, node: Node, status: str, reason: str = "") -> Node:
    with transaction.atomic():
        node = Node.objects.select_for_update().get(pk=node.pk)
        if node.status != status:
            before = snapshot(node, ["status"])
            node.status = status
            node.save(update_fields=["status"])
            audit_record(actor=actor, action="node.status", obj=node, before=before,
                         after=snapshot(node, ["status"]), message=reason)
    return node
