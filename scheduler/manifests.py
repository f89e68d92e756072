"""Pure builders of the Kubernetes objects and patches for tenants and node pools.

No I/O here: drivers send what these return. Names are deterministic so that "already exists" is
success and the next reconcile repairs drift.
"""

import json

from scheduler.driver import PoolSpec, TenantSpec

GPU_RESOURCE = "nvidia.com/gpu"
# The tenant's permissions in its namespace: a ClusterRole shipped in deploy/rbac.yaml, bound per
# namespace by the RoleBinding below.
TENANT_CLUSTER_ROLE = "gpu-marketplace-tenant"
HOSTNAME_LABEL = "kubernetes.io/hostname"
QUOTA_NAME = "gpu-quota"


def pool_label_key(prefix: str) -> str:
    return f"{prefix}/pool"


def tenant_label_key(prefix: str) -> str:
    return f"{prefix}/tenant"


def pool_labels(spec: PoolSpec) -> dict[str, str]:
    return {pool_label_key(spec.label_prefix): spec.pool, tenant_label_key(spec.label_prefix): spec.tenant}


def pool_taint(spec: PoolSpec) -> dict:
    return {"key": tenant_label_key(spec.label_prefix), "value": spec.tenant, "effect": "NoSchedule"}


def _without_our_taint(taints: list[dict], prefix: str) -> list[dict]:
    key = tenant_label_key(prefix)
    return [taint for taint in taints if taint.get("key") != key]


def node_pool_patch(spec: PoolSpec, current_taints: list[dict] | None = None) -> dict:
    """Strategic-merge patch that puts a node in the pool. Node taints are replaced as a whole list
    by the API server, so the caller passes the node's current taints and we keep the others."""
    taints = _without_our_taint(current_taints or [], spec.label_prefix) + [pool_taint(spec)]
    return {"metadata": {"labels": pool_labels(spec)}, "spec": {"unschedulable": False, "taints": taints}}


def node_release_patch(spec: PoolSpec, current_taints: list[dict] | None = None) -> dict:
    """Strategic-merge patch that takes a node out of the pool: labels removed (null), our taint
    removed, schedulable again."""
    taints = _without_our_taint(current_taints or [], spec.label_prefix)
    labels = {key: None for key in pool_labels(spec)}
    return {"metadata": {"labels": labels}, "spec": {"unschedulable": False, "taints": taints}}


def node_cordon_patch() -> dict:
    return {"spec": {"unschedulable": True}}


def tenant_namespace(spec: TenantSpec) -> dict:
    key = tenant_label_key(spec.label_prefix)
    toleration = {"key": key, "operator": "Equal", "value": spec.tenant, "effect": "NoSchedule"}
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": spec.namespace,
            # Pod Security admission: at "baseline" a tenant cannot run privileged or host-path pods,
            # which would give it root on a node that goes to the next tenant after it.
            "labels": {key: spec.tenant, f"{spec.label_prefix}/managed": "true",
                       "pod-security.kubernetes.io/enforce": spec.pod_security,
                       "pod-security.kubernetes.io/enforce-version": "latest"},
            "annotations": {
                # The PodNodeSelector and PodTolerationRestriction admission plugins read these, so
                # tenant pods land on the tenant's pool nodes by default.
                "scheduler.alpha.kubernetes.io/node-selector": f"{key}={spec.tenant}",
                "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps([toleration]),
            },
        },
    }


def tenant_objects(spec: TenantSpec) -> list[dict]:
    """Namespace first, then the objects inside it, in the order they should be applied."""
    ns = spec.namespace
    prefix = spec.label_prefix
    managed = {f"{prefix}/managed": "true", tenant_label_key(prefix): spec.tenant}
    meta = lambda name: {"name": name, "namespace": ns, "labels": managed}  # noqa: E731
    return [
        tenant_namespace(spec),
        {
            "apiVersion": "v1", "kind": "ResourceQuota", "metadata": meta(QUOTA_NAME),
            # Extended resources are quota'd on requests only (the API server never counts a
            # limits.<extended> entry: extended resources cannot be overcommitted).
            "spec": {"hard": {f"requests.{GPU_RESOURCE}": str(spec.gpus)}},
        },
        {
            "apiVersion": "v1", "kind": "LimitRange", "metadata": meta("defaults"),
            "spec": {"limits": [{"type": "Container", "defaultRequest": {"cpu": "1", "memory": "4Gi"},
                                 "default": {"cpu": "4", "memory": "16Gi"}}]},
        },
        {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta("deny-other-namespaces"),
            # Pods in this namespace accept traffic from each other only.
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": {}}]}]},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("tenant"),
            # The tenant's permissions are one ClusterRole (deploy/rbac.yaml), granted inside this
            # namespace only by this RoleBinding. A per-namespace Role would need the scheduler to
            # hold every permission in it, or the "escalate" verb on roles, which would let it
            # write itself any permission in any namespace; "bind" on this one ClusterRole is all
            # it needs instead.
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TENANT_CLUSTER_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": spec.group}],
        },
    ]


def pool_label_selector(spec: PoolSpec) -> str:
    """Selects the nodes currently labelled for this pool (one LIST instead of a GET per node)."""
    return f"{pool_label_key(spec.label_prefix)}={spec.pool}"


def node_in_pool(node: dict, spec: PoolSpec) -> bool:
    """True when a Node object already carries the pool's labels and taint and is schedulable,
    so applying the pool again needs no PATCH."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    node_spec = node.get("spec") or {}
    ours = [t for t in node_spec.get("taints") or [] if t.get("key") == tenant_label_key(spec.label_prefix)]
    wanted = pool_taint(spec)
    return (
        all(labels.get(key) == value for key, value in pool_labels(spec).items())
        and len(ours) == 1 and {k: ours[0].get(k) for k in wanted} == wanted
        and not node_spec.get("unschedulable", False)
    )


def node_belongs_to_pool(node: dict, spec: PoolSpec) -> bool:
    """Whether release may touch this node: its pool label is still this pool's, or the label is
    gone (removed by hand) from a node of this pool that carries nothing of another tenant. A node
    already handed to the next pool is left alone."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    pool = labels.get(pool_label_key(spec.label_prefix))
    if pool is not None:
        return pool == spec.pool
    if node["metadata"]["name"] not in spec.nodes:
        return False
    tenant_key = tenant_label_key(spec.label_prefix)
    taint_values = {t.get("value") for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") == tenant_key}
    return labels.get(tenant_key, spec.tenant) == spec.tenant and taint_values <= {spec.tenant}


def node_has_pool_marks(node: dict, spec: PoolSpec, count_cordon: bool = True) -> bool:
    """Anything release has to undo: our labels, our taint, or (``count_cordon``) a cordon."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    node_spec = node.get("spec") or {}
    tenant_key = tenant_label_key(spec.label_prefix)
    return (
        any(key in labels for key in pool_labels(spec))
        or any(t.get("key") == tenant_key for t in node_spec.get("taints") or [])
        or (count_cordon and bool(node_spec.get("unschedulable", False)))
    )


def event_object(*, namespace: str, name: str, reason: str, message: str, timestamp: str) -> dict:
    """A core/v1 Event in the tenant's namespace. The API server requires the involved object's
    namespace to equal the event's (and some versions refuse a namespace on a cluster-scoped kind
    such as Namespace), so the event refers to the tenant's GPU quota, which lives there."""
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "ResourceQuota", "name": QUOTA_NAME, "namespace": namespace},
        "reason": reason, "message": message[:1024], "type": "Normal",
        "firstTimestamp": timestamp, "lastTimestamp": timestamp, "count": 1,
        "source": {"component": "gpu-marketplace-scheduler"},
    }
