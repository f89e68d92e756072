"""The contract between the scheduler's orchestration and one cluster.

Orchestration (``scheduler/reconcile.py``, ``scheduler/tasks.py``) decides *what* a cluster should
look like and calls a ``ClusterDriver``; drivers decide *how*:

- ``KubernetesDriver`` (``scheduler/kube_driver.py``) talks to a real API server through
  ``scheduler/kube.py``, the only module that imports ``kubernetes``;
- ``PlanDriver`` (``scheduler/plan_driver.py``) has no cluster: it records every object and patch
  it would apply, so the embedded default shows the plan in the UI and API.

Every method is idempotent and level-based: called twice with the same spec it leaves the same
state and the same number of objects. Drivers never touch the database transactionally around a
network call; they raise ``RetryLater`` (try again: 429, 5xx, timeouts, conflicts) or ``GiveUp``
(will not succeed by retrying: forbidden, invalid, node gone) and nothing else.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class ClusterError(Exception):
    """Base of the two errors a driver may raise."""


class RetryLater(ClusterError):
    """Transient failure: the same call may succeed later."""


class GiveUp(ClusterError):
    """Permanent failure: retrying the same call will not help."""


@dataclass(frozen=True)
class TenantSpec:
    """The tenant's per-cluster objects: namespace, quota, limits, network policy, RBAC."""

    cluster: str  # Cluster.name
    tenant: str  # Tenant.slug
    group: str  # subject of the RoleBinding
    namespace: str  # deterministic: namespace_for(tenant)
    gpus: int  # ResourceQuota requests.nvidia.com/gpu; 0 means the tenant has nothing left here
    label_prefix: str
    pod_security: str = "baseline"  # the Pod Security Standard enforced in the namespace


@dataclass(frozen=True)
class PoolSpec:
    """One reservation's node pool on one cluster."""

    cluster: str
    pool: str  # Reservation.pool_name
    reservation_id: str
    tenant: str
    namespace: str
    nodes: tuple[str, ...]  # Kubernetes node names
    gpus_per_node: int
    label_prefix: str


@dataclass
class NodeState:
    name: str
    exists: bool
    ready: bool = False
    gpus: int = 0  # allocatable nvidia.com/gpu
    unschedulable: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)


@dataclass
class ReadinessResult:
    """The readiness and isolation check of a pool; stored on the reservation as JSON."""

    passed: bool
    checked_at: datetime
    problems: list[str]
    nodes: dict[str, dict]  # per node: ready, gpus, labels_ok, taint_ok, foreign_pods (a count: tenants see it)
    plan_only: bool = False

    def as_json(self) -> dict:
        return {
            "passed": self.passed, "checked_at": self.checked_at.isoformat(), "problems": self.problems,
            "nodes": self.nodes, "plan_only": self.plan_only,
        }


class ClusterDriver(Protocol):
    kind: str  # "kubernetes" or "plan"

    def ensure_tenant(self, spec: TenantSpec) -> None:
        """Namespace (labels; node-selector and defaultTolerations annotations), ResourceQuota on
        requests.nvidia.com/gpu = spec.gpus, LimitRange, NetworkPolicy denying ingress from other
        namespaces, Role + RoleBinding for spec.group. With spec.gpus == 0, delete them."""

    def apply_pool(self, spec: PoolSpec) -> None:
        """Label (<prefix>/pool, <prefix>/tenant) and taint (<prefix>/tenant=<slug>:NoSchedule)
        every node, and make it schedulable. One PATCH per node where possible."""

    def check_pool(self, spec: PoolSpec) -> ReadinessResult:
        """Every node exists, is Ready, reports gpus_per_node GPUs, carries the labels and taint,
        and runs no pods of anyone but the tenant (DaemonSet/system pods excepted)."""

    def observe_nodes(self, names: list[str]) -> dict[str, NodeState]:
        """Current state of the named nodes (exists=False for a node that is gone)."""

    def drain_pool(self, spec: PoolSpec, *, force: bool) -> int:
        """Cordon the nodes and evict the tenant's pods on them through the Eviction API; with
        force, delete them with grace period 0. Returns how many tenant pods remain."""

    def unlabel_pool(self, spec: PoolSpec) -> None:
        """Remove this pool's labels and taint and uncordon — only on nodes whose pool label is
        still spec.pool, so a node already handed to the next pool is left alone."""

    def post_event(self, *, namespace: str, name: str, reason: str, message: str) -> None:
        """A Kubernetes Event in the tenant's namespace (deterministic name: posting twice is one event)."""


def namespace_for(tenant_slug: str) -> str:
    return f"tenant-{tenant_slug}"
