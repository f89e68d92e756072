"""``KubernetesDriver``: the ``ClusterDriver`` contract on a real API server, through ``scheduler.kube``.

Level-based and idempotent: every method reads the actual state, compares it with the desired
state built by ``scheduler.manifests`` and writes only the difference. Names are deterministic, so
"already exists" is success and a second call changes nothing.

Request budget (a 1,024-node pool must not cost thousands of round trips more than necessary):
- nodes are read in bulk: one LIST per ~200 node names (label selector on the
  ``kubernetes.io/hostname`` label the kubelet sets to the node name), or one paged LIST of the
  pool's label; only a node the LIST did not return is read with a GET;
- one PATCH per node that needs a change, carrying labels, taint and ``unschedulable`` together.
  A Node's taints are one list the API server replaces as a whole, so the patch carries the
  node's other taints as read, plus the ``resourceVersion`` it was read at: if anything changed
  the node in between, the server answers 409 and the node is read again and re-patched;
- per-node work runs on a small thread pool, so a large pool is bounded by the API server rather
  than by round-trip latency.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from scheduler import manifests
from scheduler.driver import ClusterError, GiveUp, NodeState, PoolSpec, ReadinessResult, RetryLater, TenantSpec
from scheduler.kube import AlreadyExists, Conflict, KubeApi, NotFound, RetryPolicy, TooManyRequests, api_for

T = TypeVar("T")

# A label value: at most 63 characters of this shape (node names longer than that are read by GET).
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Keep each LIST's URL well under the API server's and proxies' limits.
_SELECTOR_BUDGET = 6000
_CONFLICT_ATTEMPTS = 4


def _name(obj: dict) -> str:
    return obj["metadata"]["name"]


def _node_ready(node: dict) -> bool:
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def _node_gpus(node: dict) -> int:
    value = ((node.get("status") or {}).get("allocatable") or {}).get(manifests.GPU_RESOURCE, "0")
    try:
        return int(str(value))
    except ValueError:
        return 0


def _is_subset(desired: Any, actual: Any) -> bool:
    """Desired fields present with equal values in actual (the server may add defaults)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(_is_subset(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(actual, list) and len(desired) == len(actual) and all(
            _is_subset(d, a) for d, a in zip(desired, actual, strict=True))
    return desired == actual


# The parts of each kind that define it (everything else is metadata or server-owned status).
# Quota and binding must match exactly (an extra limit or subject added by hand is drift); the
# others only need our fields, since the API server may fill in defaults.
_EXACT_KINDS = {"ResourceQuota", "RoleBinding"}
_BODY_FIELDS = {
    "ResourceQuota": ("spec",), "LimitRange": ("spec",), "NetworkPolicy": ("spec",),
    "Role": ("rules",), "RoleBinding": ("roleRef", "subjects"),
}


class KubernetesDriver:
    kind = "kubernetes"

    def __init__(self, api: KubeApi, *, workers: int = 8, system_namespaces: Iterable[str] = ("kube-system",)) -> None:
        self.api = api
        self.cluster = api.cluster
        self.workers = max(1, workers)
        self.system_namespaces = frozenset(system_namespaces)

    @classmethod
    def for_cluster(cls, cluster: Any) -> KubernetesDriver:
        """The driver of a registered ``inventory.Cluster`` (kubeconfig + context, or in-cluster)."""
        return cls(api_for(cluster.name, connection=cluster.connection, kubeconfig_path=cluster.kubeconfig_path,
                           context=cluster.kube_context))

    @classmethod
    def from_kubeconfig(cls, path: str, context: str = "", *, cluster: str = "default",
                        policy: RetryPolicy | None = None, workers: int = 8) -> KubernetesDriver:
        """An uncached driver for an explicit kubeconfig (tests, the benchmark)."""
        return cls(KubeApi.from_kubeconfig(cluster, path, context, policy), workers=workers)

    @classmethod
    def from_url(cls, url: str, *, token: str = "", cluster: str = "default", policy: RetryPolicy | None = None,
                 workers: int = 8) -> KubernetesDriver:
        """An uncached driver for an API server URL (tests, ad-hoc tools)."""
        return cls(KubeApi.from_url(cluster, url, token=token, policy=policy), workers=workers)

    # --- helpers --------------------------------------------------------------------------------
    def _each(self, what: str, items: list[T], work: Callable[[T], Any]) -> list[Any]:
        """Run ``work`` for every item on the thread pool; after all ran, raise one error naming
        every failure: GiveUp if any item cannot succeed by retrying, else RetryLater."""
        if not items:
            return []
        results: list[Any] = [None] * len(items)
        errors: list[tuple[T, ClusterError]] = []

        def run(index: int) -> None:
            try:
                results[index] = work(items[index])
            except ClusterError as exc:
                errors.append((items[index], exc))

        if len(items) == 1 or self.workers == 1:
            for index in range(len(items)):
                run(index)
        else:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(items)), thread_name_prefix="kube") as pool:
                list(pool.map(run, range(len(items))))
        if errors:
            detail = "; ".join(f"{item}: {exc}" for item, exc in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            error_class = GiveUp if any(isinstance(exc, GiveUp) for _, exc in errors) else RetryLater
            raise error_class(f"{what}: {len(errors)} of {len(items)} failed: {detail}{more}")
        return results

    def _get_node(self, name: str) -> dict | None:
        try:
            return self.api.call("get", self.api.core.read_node, name)
        except NotFound:
            return None

    def _read_nodes(self, names: Iterable[str], label_selector: str | None = None) -> dict[str, dict | None]:
        """The named nodes (None for a node that does not exist), read with as few LISTs as possible.

        With ``label_selector`` (the pool's label) first one paged LIST of it; the names it did not
        return (all of them without a selector) through LISTs selecting them by the
        ``kubernetes.io/hostname`` label; whatever is still missing (a hostname that differs from
        the node name, a node that is gone) with a GET."""
        wanted = list(dict.fromkeys(names))
        found: dict[str, dict | None] = {}
        if label_selector is not None:
            for node in self.api.list_all("list", self.api.core.list_node, label_selector=label_selector):
                found[_name(node)] = node
        by_hostname = [n for n in wanted if n not in found and len(n) <= 63 and _LABEL_VALUE.match(n)]
        for selector in self._hostname_selectors(by_hostname):
            for node in self.api.list_all("list", self.api.core.list_node, label_selector=selector):
                if _name(node) in wanted:
                    found[_name(node)] = node
        missing = [name for name in wanted if name not in found]
        for name, node in zip(missing, self._each("read nodes", missing, self._get_node), strict=True):
            found[name] = node
        return found

    @staticmethod
    def _hostname_selectors(names: list[str]) -> list[str]:
        selectors, chunk, size = [], [], 0
        for name in names:
            if chunk and size + len(name) + 1 > _SELECTOR_BUDGET:
                selectors.append(f"{manifests.HOSTNAME_LABEL} in ({','.join(chunk)})")
                chunk, size = [], 0
            chunk.append(name)
            size += len(name) + 1
        if chunk:
            selectors.append(f"{manifests.HOSTNAME_LABEL} in ({','.join(chunk)})")
        return selectors

    def _patch_node_guarded(self, name: str, node: dict | None, build: Callable[[dict], dict | None]) -> None:
        """PATCH a node with the body ``build(node)`` returns (None: nothing to do), guarded by the
        resourceVersion it was read at; on 409 read it again and rebuild."""
        for _ in range(_CONFLICT_ATTEMPTS):
            if node is None:
                raise NotFound(f"cluster {self.cluster}: node {name} does not exist")
            patch = build(node)
            if patch is None:
                return
            patch.setdefault("metadata", {})["resourceVersion"] = node["metadata"]["resourceVersion"]
            try:
                self.api.call("patch", self.api.core.patch_node, name, patch)
                return
            except Conflict:
                node = self._get_node(name)
        raise RetryLater(f"cluster {self.cluster}: node {name} kept changing while being patched")

    # --- tenant ---------------------------------------------------------------------------------
    def _object_calls(self, obj: dict) -> tuple[Callable, Callable, Callable, Callable]:
        """(read, create, replace, delete) bound methods for a tenant object's kind."""
        api = self.api
        return {
            "ResourceQuota": (api.core.read_namespaced_resource_quota, api.core.create_namespaced_resource_quota,
                              api.core.replace_namespaced_resource_quota, api.core.delete_namespaced_resource_quota),
            "LimitRange": (api.core.read_namespaced_limit_range, api.core.create_namespaced_limit_range,
                           api.core.replace_namespaced_limit_range, api.core.delete_namespaced_limit_range),
            "NetworkPolicy": (api.networking.read_namespaced_network_policy,
                              api.networking.create_namespaced_network_policy,
                              api.networking.replace_namespaced_network_policy,
                              api.networking.delete_namespaced_network_policy),
            "Role": (api.rbac.read_namespaced_role, api.rbac.create_namespaced_role, api.rbac.replace_namespaced_role,
                     api.rbac.delete_namespaced_role),
            "RoleBinding": (api.rbac.read_namespaced_role_binding, api.rbac.create_namespaced_role_binding,
                            api.rbac.replace_namespaced_role_binding, api.rbac.delete_namespaced_role_binding),
        }[obj["kind"]]

    def _ensure_namespace(self, desired: dict) -> None:
        name = _name(desired)
        for _ in range(_CONFLICT_ATTEMPTS):
            try:
                actual = self.api.call("get", self.api.core.read_namespace, name)
            except NotFound:
                try:
                    self.api.call("create", self.api.core.create_namespace, desired)
                    return
                except AlreadyExists:
                    continue  # created concurrently: read it and compare
            if (actual.get("metadata") or {}).get("deletionTimestamp") or (actual.get("status") or {}).get("phase") == "Terminating":
                raise RetryLater(f"cluster {self.cluster}: namespace {name} is still being deleted")
            if _is_subset({k: desired["metadata"][k] for k in ("labels", "annotations")}, actual["metadata"]):
                return
            # Merge patch: adds/overwrites our labels and annotations, keeps everyone else's.
            patch = {"metadata": {"labels": desired["metadata"]["labels"],
                                  "annotations": desired["metadata"]["annotations"],
                                  "resourceVersion": actual["metadata"]["resourceVersion"]}}
            try:
                self.api.call("patch", self.api.core.patch_namespace, name, patch, _content_type="application/merge-patch+json")
                return
            except Conflict:
                continue
        raise RetryLater(f"cluster {self.cluster}: namespace {name} kept changing")

    def _ensure_object(self, desired: dict) -> None:
        read, create, replace, delete = self._object_calls(desired)
        name, namespace, kind = _name(desired), desired["metadata"]["namespace"], desired["kind"]
        fields = _BODY_FIELDS[kind]
        for _ in range(_CONFLICT_ATTEMPTS):
            try:
                actual = self.api.call("get", read, name, namespace)
            except NotFound:
                try:
                    self.api.call("create", create, namespace, desired)
                    return
                except AlreadyExists:
                    continue
            desired_meta = {"labels": desired["metadata"]["labels"]}
            body = {f: desired.get(f) for f in fields}
            in_sync = all(actual.get(f) == body[f] for f in fields) if kind in _EXACT_KINDS else _is_subset(body, actual)
            if in_sync and _is_subset(desired_meta, actual["metadata"]):
                return
            if kind == "RoleBinding" and not _is_subset(desired["roleRef"], actual.get("roleRef")):
                # roleRef is immutable: replace the binding.
                try:
                    self.api.call("delete", delete, name, namespace, body={"preconditions": {"uid": actual["metadata"]["uid"]}})
                except (NotFound, Conflict):
                    pass
                continue
            repaired = dict(actual)
            for f in fields:
                repaired[f] = desired[f]
            repaired["metadata"] = dict(actual["metadata"])
            repaired["metadata"]["labels"] = {**(actual["metadata"].get("labels") or {}), **desired["metadata"]["labels"]}
            try:
                self.api.call("update", replace, name, namespace, repaired)  # carries resourceVersion: 409 if stale
                return
            except Conflict:
                continue
        raise RetryLater(f"cluster {self.cluster}: {kind} {namespace}/{name} kept changing")

    def ensure_tenant(self, spec: TenantSpec) -> None:
        objects = manifests.tenant_objects(spec)
        namespace, inside = objects[0], objects[1:]
        if spec.gpus == 0:
            self._remove_tenant(spec, namespace, inside)
            return
        self._ensure_namespace(namespace)
        self._each(f"tenant {spec.tenant} objects", inside, self._ensure_object)

    def _remove_tenant(self, spec: TenantSpec, namespace: dict, inside: list[dict]) -> None:
        try:
            actual = self.api.call("get", self.api.core.read_namespace, spec.namespace)
        except NotFound:
            return
        labels = (actual.get("metadata") or {}).get("labels") or {}
        if labels.get(f"{spec.label_prefix}/managed") != "true":
            raise GiveUp(f"cluster {self.cluster}: namespace {spec.namespace} is not managed by the marketplace; not deleting it")
        if (actual.get("metadata") or {}).get("deletionTimestamp"):
            return  # already being deleted
        # The binding first, so the group loses access at once; the namespace then takes the rest.
        for obj in reversed(inside):
            try:
                self.api.call("delete", self._object_calls(obj)[3], _name(obj), spec.namespace)
            except NotFound:
                pass
        try:
            self.api.call("delete", self.api.core.delete_namespace, spec.namespace)
        except NotFound:
            pass

    # --- pool -----------------------------------------------------------------------------------
    def apply_pool(self, spec: PoolSpec) -> None:
        nodes = self._read_nodes(spec.nodes)

        def build(node: dict) -> dict | None:
            if manifests.node_in_pool(node, spec):
                return None
            return manifests.node_pool_patch(spec, (node.get("spec") or {}).get("taints") or [])

        self._each(f"apply pool {spec.pool}", list(nodes),
                   lambda name: self._patch_node_guarded(name, nodes[name], build))

    def check_pool(self, spec: PoolSpec) -> ReadinessResult:
        nodes = self._read_nodes(spec.nodes, manifests.pool_label_selector(spec))
        pool_labels = manifests.pool_labels(spec)
        taint = manifests.pool_taint(spec)

        def inspect(name: str) -> tuple[dict, list[str]]:
            node = nodes[name]
            if node is None:
                return {"exists": False}, [f"node {name} does not exist"]
            labels = node["metadata"].get("labels") or {}
            taints = (node.get("spec") or {}).get("taints") or []
            finding = {
                "exists": True,
                "ready": _node_ready(node),
                "gpus": _node_gpus(node),
                "schedulable": not (node.get("spec") or {}).get("unschedulable", False),
                "labels_ok": all(labels.get(k) == v for k, v in pool_labels.items()),
                "taint_ok": any({k: t.get(k) for k in taint} == taint for t in taints),
                # A count: the readiness is shown to the tenant, and other tenants' namespace and
                # pod names are none of its business.
                "foreign_pods": len(self._foreign_pods(name, spec.namespace)),
            }
            problems = []
            if not finding["ready"]:
                problems.append(f"node {name} is not Ready")
            if finding["gpus"] != spec.gpus_per_node:
                problems.append(f"node {name} reports {finding['gpus']} allocatable GPUs, expected {spec.gpus_per_node}")
            if not finding["schedulable"]:
                problems.append(f"node {name} is cordoned")
            if not finding["labels_ok"]:
                problems.append(f"node {name} lacks the pool labels")
            if not finding["taint_ok"]:
                problems.append(f"node {name} lacks the tenant taint")
            if finding["foreign_pods"]:
                problems.append(f"node {name} runs pods of others ({finding['foreign_pods']})")
            return finding, problems

        names = list(dict.fromkeys(spec.nodes))
        results = self._each(f"check pool {spec.pool}", names, inspect)
        return ReadinessResult(
            passed=not any(problems for _, problems in results),
            checked_at=datetime.now(UTC),
            problems=[problem for _, problems in results for problem in problems],
            nodes={name: finding for name, (finding, _) in zip(names, results, strict=True)},
        )

    def _foreign_pods(self, node: str, namespace: str) -> list[str]:
        """Running or pending pods on the node that belong to anyone but the tenant: DaemonSet pods,
        static (mirror) pods and pods of the system namespaces are part of the node, not tenants."""
        pods = self.api.list_all(
            "list", self.api.core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={node},status.phase!=Succeeded,status.phase!=Failed",
        )
        foreign = []
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("namespace") == namespace or meta.get("namespace") in self.system_namespaces:
                continue
            if any(ref.get("kind") == "DaemonSet" for ref in meta.get("ownerReferences") or []):
                continue
            if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
                continue
            foreign.append(f"{meta.get('namespace')}/{meta['name']}")
        return sorted(foreign)

    def observe_nodes(self, names: list[str]) -> dict[str, NodeState]:
        states = {}
        for name, node in self._read_nodes(names).items():
            if node is None:
                states[name] = NodeState(name=name, exists=False)
                continue
            states[name] = NodeState(
                name=name, exists=True, ready=_node_ready(node), gpus=_node_gpus(node),
                unschedulable=bool((node.get("spec") or {}).get("unschedulable", False)),
                labels=dict(node["metadata"].get("labels") or {}),
                taints=list((node.get("spec") or {}).get("taints") or []),
            )
        return states

    def _release_nodes(self, spec: PoolSpec) -> dict[str, dict]:
        """The nodes release may touch (see ``manifests.node_belongs_to_pool``), by name."""
        nodes = self._read_nodes(spec.nodes, manifests.pool_label_selector(spec))
        return {name: node for name, node in nodes.items() if node is not None and manifests.node_belongs_to_pool(node, spec)}

    def drain_pool(self, spec: PoolSpec, *, force: bool) -> int:
        nodes = self._release_nodes(spec)
        # Cordon only nodes still carrying the pool's labels or taint: a drain repeated after the
        # release must not cordon nodes already back in the idle inventory.
        to_cordon = [name for name, node in nodes.items()
                     if manifests.node_has_pool_marks(node, spec, count_cordon=False)
                     and not (node.get("spec") or {}).get("unschedulable")]
        # No resourceVersion guard needed: this patch touches no list.
        self._each(f"cordon pool {spec.pool}", to_cordon, self._cordon)
        pods = self._tenant_pods(spec.namespace, set(nodes))
        if not pods:
            return 0
        self._each(f"{'delete' if force else 'evict'} pods of pool {spec.pool}", pods,
                   lambda pod: self._remove_pod(pod, force))
        return len(self._tenant_pods(spec.namespace, set(nodes)))

    def _cordon(self, name: str) -> None:
        try:
            self.api.call("patch", self.api.core.patch_node, name, manifests.node_cordon_patch())
        except NotFound:
            pass  # gone: nothing left to schedule onto

    def _tenant_pods(self, namespace: str, nodes: set[str]) -> list[dict]:
        if not nodes:
            return []
        try:
            pods = self.api.list_all("list", self.api.core.list_namespaced_pod, namespace)
        except NotFound:
            return []
        return [pod for pod in pods if (pod.get("spec") or {}).get("nodeName") in nodes]

    def _remove_pod(self, pod: dict, force: bool) -> None:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        try:
            if force:
                self.api.call("delete", self.api.core.delete_namespaced_pod, name, namespace,
                              grace_period_seconds=0, body={"gracePeriodSeconds": 0})
            elif not pod["metadata"].get("deletionTimestamp"):
                eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
                self.api.call("evict", self.api.core.create_namespaced_pod_eviction, name, namespace, eviction,
                              _no_retry={429})
        except NotFound:
            pass
        except TooManyRequests:
            pass  # a disruption budget holds it: it stays in the remaining count until forced

    def unlabel_pool(self, spec: PoolSpec) -> None:
        nodes = self._release_nodes(spec)

        def build(node: dict) -> dict | None:
            if not manifests.node_belongs_to_pool(node, spec) or not manifests.node_has_pool_marks(node, spec):
                return None
            return manifests.node_release_patch(spec, (node.get("spec") or {}).get("taints") or [])

        def release(name: str) -> None:
            try:
                self._patch_node_guarded(name, nodes[name], build)
            except NotFound:
                pass  # a node that is gone carries no labels

        self._each(f"release pool {spec.pool}", list(nodes), release)

    def post_event(self, *, namespace: str, name: str, reason: str, message: str) -> None:
        timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = manifests.event_object(namespace=namespace, name=name, reason=reason, message=message, timestamp=timestamp)
        try:
            self.api.call("create", self.api.core.create_namespaced_event, namespace, event)
        except AlreadyExists:
            pass  # posted before
