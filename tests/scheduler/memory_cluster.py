"""A test-only cluster driver: an in-memory cluster implementing the ``ClusterDriver`` protocol,
with the state the tests assert on (node labels and taints, tenant namespaces, pods, events) and
fault injection. It stands in for a cluster where the fake API server is not needed."""

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from django.utils import timezone

from scheduler import manifests
from scheduler.driver import GiveUp, NodeState, PoolSpec, ReadinessResult, TenantSpec


@dataclass
class Pod:
    namespace: str
    name: str
    node: str
    stubborn: bool = False  # ignores eviction (a PodDisruptionBudget, a slow shutdown)


@dataclass
class MemoryCluster:
    kind: str = "memory"
    nodes: dict[str, NodeState] = field(default_factory=dict)
    namespaces: dict[str, dict] = field(default_factory=dict)  # name -> {"gpus": n, "group": g}
    pods: list[Pod] = field(default_factory=list)
    events: dict[tuple[str, str], dict] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    faults: dict[str, list[Exception]] = field(default_factory=lambda: defaultdict(list))

    # --- test controls ---
    def add_node(self, name: str, gpus: int = 8) -> None:
        self.nodes[name] = NodeState(name=name, exists=True, ready=True, gpus=gpus)

    def fail(self, method: str, error: Exception, times: int = 1) -> None:
        self.faults[method].extend([error] * times)

    def labels(self, node: str) -> dict[str, str]:
        return dict(self.nodes[node].labels)

    def taint_keys(self, node: str) -> list[str]:
        return [taint["key"] for taint in self.nodes[node].taints]

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if self.faults[method]:
            raise self.faults[method].pop(0)

    def _node(self, name: str) -> NodeState:
        node = self.nodes.get(name)
        if node is None or not node.exists:
            raise GiveUp(f"node {name} not found")
        return node

    # --- the protocol ---
    def ensure_tenant(self, spec: TenantSpec) -> None:
        self._call("ensure_tenant")
        if spec.gpus == 0:
            self.namespaces.pop(spec.namespace, None)
            self.pods = [pod for pod in self.pods if pod.namespace != spec.namespace]
        else:
            self.namespaces[spec.namespace] = {"gpus": spec.gpus, "group": spec.group}

    def apply_pool(self, spec: PoolSpec) -> None:
        self._call("apply_pool")
        for name in spec.nodes:
            node = self._node(name)
            patch = manifests.node_pool_patch(spec, node.taints)
            node.labels.update(patch["metadata"]["labels"])
            node.taints = copy.deepcopy(patch["spec"]["taints"])
            node.unschedulable = False

    def check_pool(self, spec: PoolSpec) -> ReadinessResult:
        self._call("check_pool")
        problems, report = [], {}
        for name in spec.nodes:
            node = self.nodes.get(name)
            if node is None or not node.exists:
                problems.append(f"{name}: not found")
                report[name] = {"exists": False}
                continue
            labels_ok = all(node.labels.get(k) == v for k, v in manifests.pool_labels(spec).items())
            taint_ok = manifests.pool_taint(spec) in node.taints
            foreign = sum(1 for p in self.pods if p.node == name and p.namespace != spec.namespace)
            report[name] = {"ready": node.ready, "gpus": node.gpus, "labels_ok": labels_ok, "taint_ok": taint_ok,
                            "foreign_pods": foreign}
            if not node.ready:
                problems.append(f"{name}: NotReady")
            if node.gpus < spec.gpus_per_node:
                problems.append(f"{name}: {node.gpus} of {spec.gpus_per_node} GPUs")
            if not (labels_ok and taint_ok):
                problems.append(f"{name}: labels or taint missing")
            if foreign:
                problems.append(f"{name}: pods of others running")
        return ReadinessResult(passed=not problems, checked_at=timezone.now(), problems=problems, nodes=report)

    def observe_nodes(self, names: list[str]) -> dict[str, NodeState]:
        self._call("observe_nodes")
        return {name: copy.deepcopy(self.nodes.get(name) or NodeState(name=name, exists=False)) for name in names}

    def drain_pool(self, spec: PoolSpec, *, force: bool) -> int:
        self._call("drain_pool")
        for name in spec.nodes:
            self._node(name).unschedulable = True
        mine = [p for p in self.pods if p.node in spec.nodes and p.namespace == spec.namespace]
        evicted = [p for p in mine if force or not p.stubborn]
        self.pods = [p for p in self.pods if p not in evicted]
        return len(mine) - len(evicted)

    def unlabel_pool(self, spec: PoolSpec) -> None:
        self._call("unlabel_pool")
        key = manifests.pool_label_key(spec.label_prefix)
        for name in spec.nodes:
            node = self._node(name)
            if node.labels.get(key) != spec.pool:
                continue
            patch = manifests.node_release_patch(spec, node.taints)
            for label in patch["metadata"]["labels"]:
                node.labels.pop(label, None)
            node.taints = patch["spec"]["taints"]
            node.unschedulable = False

    def post_event(self, *, namespace: str, name: str, reason: str, message: str) -> None:
        self._call("post_event")
        self.events[(namespace, name)] = {"reason": reason, "message": message}

    # --- what the tests assert ---
    def pool_members(self, prefix: str = "gpu.marketplace.io") -> dict[str, str]:
        return {name: node.labels[f"{prefix}/pool"] for name, node in self.nodes.items()
                if f"{prefix}/pool" in node.labels}

    def orphans(self, prefix: str = "gpu.marketplace.io") -> list[str]:
        """Anything of ours left on the cluster: labels, taints, cordons, namespaces."""
        left = [f"label on {n}" for n, s in self.nodes.items() if any(k.startswith(prefix) for k in s.labels)]
        left += [f"taint on {n}" for n, s in self.nodes.items() if any(t["key"].startswith(prefix) for t in s.taints)]
        left += [f"cordon on {n}" for n, s in self.nodes.items() if s.unschedulable]
        left += [f"namespace {ns}" for ns in self.namespaces]
        return left
