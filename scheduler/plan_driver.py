"""The plan-only driver: no cluster, so it records what it would apply (shown in the UI and API).

Used for clusters whose connection is "plan" — the embedded default. It reports every pool as
ready, clearly marked ``plan_only``, so the lifecycle runs end to end without Kubernetes.
"""

from django.utils import timezone

from marketplace.pools.services import planned_operation_record
from scheduler import manifests
from scheduler.driver import NodeState, PoolSpec, ReadinessResult, TenantSpec


class PlanDriver:
    kind = "plan"

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def _record(self, verb: str, kind: str, name: str, body: dict, namespace: str = "", reservation_id=None) -> None:
        planned_operation_record(
            cluster=self.cluster, verb=verb, kind=kind, name=name, body=body, namespace=namespace,
            reservation_id=reservation_id,
        )

    def ensure_tenant(self, spec: TenantSpec) -> None:
        if spec.gpus == 0:
            for obj in manifests.tenant_objects(spec):
                self._record("delete", obj["kind"], obj["metadata"]["name"], {}, obj["metadata"].get("namespace", ""))
            return
        for obj in manifests.tenant_objects(spec):
            self._record("apply", obj["kind"], obj["metadata"]["name"], obj, obj["metadata"].get("namespace", ""))

    def apply_pool(self, spec: PoolSpec) -> None:
        for node in spec.nodes:
            self._record("patch", "Node", node, manifests.node_pool_patch(spec), reservation_id=spec.reservation_id)

    def check_pool(self, spec: PoolSpec) -> ReadinessResult:
        return ReadinessResult(
            passed=True, checked_at=timezone.now(), problems=[], plan_only=True,
            nodes={node: {"plan_only": True} for node in spec.nodes},
        )

    def observe_nodes(self, names: list[str]) -> dict[str, NodeState]:
        # Nothing to observe: plan-only nodes are as healthy as the inventory says.
        return {name: NodeState(name=name, exists=True, ready=True) for name in names}

    def drain_pool(self, spec: PoolSpec, *, force: bool) -> int:
        for node in spec.nodes:
            self._record("patch", "Node", node, {"spec": {"unschedulable": True}}, reservation_id=spec.reservation_id)
            self._record("evict", "Pod", f"pods of {spec.namespace} on {node}", {"force": force},
                         namespace=spec.namespace, reservation_id=spec.reservation_id)
        return 0

    def unlabel_pool(self, spec: PoolSpec) -> None:
        for node in spec.nodes:
            self._record("patch", "Node", node, manifests.node_release_patch(spec), reservation_id=spec.reservation_id)

    def post_event(self, *, namespace: str, name: str, reason: str, message: str) -> None:
        self._record("create", "Event", name, {"reason": reason, "message": message}, namespace=namespace)
