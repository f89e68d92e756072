"""Pure builders of the Kubernetes objects and patches for tenants and node pools.

No I/O here: drivers send what these return. Names are deterministic so that "already exists" is
success and the next reconcile repairs drift.
"""

import json

from scheduler.driver import PoolSpec, TenantSpec

GPU_RESOURCE = "nvidia.com/gpu"


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
            "labels": {key: spec.tenant, f"{spec.label_prefix}/managed": "true"},
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
            "apiVersion": "v1", "kind": "ResourceQuota", "metadata": meta("gpu-quota"),
            "spec": {"hard": {f"requests.{GPU_RESOURCE}": str(spec.gpus), f"limits.{GPU_RESOURCE}": str(spec.gpus)}},
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
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("tenant"),
            "rules": [
                {"apiGroups": ["", "apps", "batch"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                 "resources": ["pods", "pods/log", "pods/exec", "services", "configmaps", "secrets",
                               "persistentvolumeclaims", "deployments", "statefulsets", "jobs", "cronjobs"]},
                {"apiGroups": [""], "verbs": ["get", "list", "watch"], "resources": ["events", "resourcequotas"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("tenant"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": spec.group}],
        },
    ]
