import hashlib
import json

from marketplace.inventory.models import Cluster
from marketplace.pools.models import PlannedOperation


def planned_operation_record(
    *, cluster: str, verb: str, kind: str, name: str, body: dict, namespace: str = "", reservation_id: str | None = None
) -> PlannedOperation:
    """Record one operation of the plan-only driver; recording the same one again changes nothing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    body_hash = hashlib.sha256(canonical.encode()).hexdigest()
    cluster_id = Cluster.objects.values_list("pk", flat=True).get(name=cluster)
    operation, _ = PlannedOperation.objects.get_or_create(
        cluster_id=cluster_id, reservation_id=reservation_id, verb=verb, kind=kind, namespace=namespace, name=name,
        body_hash=body_hash, defaults={"body": json.loads(canonical)},
    )
    return operation
