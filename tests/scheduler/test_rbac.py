"""deploy/rbac.yaml grants the scheduler exactly what the driver uses: every request of a full pool
lifecycle (drift repair included) on the fake server is allowed by the scheduler's ClusterRole, and
every verb that ClusterRole grants is used."""

from pathlib import Path
from urllib.parse import urlsplit

import yaml

from scheduler import manifests
from scheduler.kube_driver import KubernetesDriver
from tests.scheduler.conftest import FAST_POLICY, PREFIX

RBAC = Path(__file__).resolve().parents[2] / "deploy" / "rbac.yaml"
VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def rbac_documents() -> list[dict]:
    return list(yaml.safe_load_all(RBAC.read_text()))


def granted() -> set[tuple[str, str, str]]:
    role = next(d for d in rbac_documents() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "gpu-marketplace-scheduler")
    return {(group, resource, verb) for rule in role["rules"] if "resourceNames" not in rule
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def as_permissions(log: list[tuple[str, str]]) -> set[tuple[str, str, str]]:
    """(API group, resource[/subresource], verb) of each request, as the RBAC authorizer sees it."""
    calls = set()
    for method, raw in log:
        parts = [p for p in urlsplit(raw).path.split("/") if p]
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        if len(rest) >= 3 and rest[0] == "namespaces":
            rest = rest[2:]
        resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
        verb = VERBS.get(method) or ("get" if len(rest) > 1 else "list")
        calls.add((group, resource, verb))
    return calls


def test_the_scheduler_cluster_role_is_exactly_what_the_driver_uses(cluster, fake_only, tmp_path):
    driver = KubernetesDriver.from_kubeconfig(fake_only.write_kubeconfig(tmp_path / "scheduler", token="scheduler"),
                                              cluster="test", policy=FAST_POLICY)
    nodes = [cluster.add_node("gpu-0"), cluster.add_node("gpu-1", hostname_label=False)]  # the 2nd is read by name
    tenant = cluster.tenant()
    pool = cluster.pool(nodes, tenant)

    driver.ensure_tenant(tenant)
    # Drift on every kind of object, repaired by the next ensure.
    api, ns = cluster.api, tenant.namespace
    api.call("patch", api.core.patch_namespace, ns, {"metadata": {"labels": {f"{PREFIX}/managed": None}}})
    api.call("patch", api.core.patch_namespaced_resource_quota, "gpu-quota", ns, {"spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    api.call("patch", api.core.patch_namespaced_limit_range, "defaults", ns, {"spec": {"limits": []}})
    api.call("patch", api.networking.patch_namespaced_network_policy, "deny-other-namespaces", ns, {"spec": {"ingress": []}})
    api.call("patch", api.rbac.patch_namespaced_role_binding, "tenant", ns, {"subjects": []})
    driver.ensure_tenant(tenant)
    fake_only.objects[("rolebindings", ns, "tenant")]["roleRef"]["name"] = "view"  # immutable on a real server
    driver.ensure_tenant(tenant)
    driver.apply_pool(pool)
    cluster.add_pod(tenant.namespace, "job", nodes[0])
    driver.check_pool(pool)
    driver.post_event(namespace=tenant.namespace, name="ending", reason="ReservationEnding", message="soon")
    driver.drain_pool(pool, force=False)
    driver.drain_pool(pool, force=True)
    driver.unlabel_pool(pool)
    driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 0}))
    driver.api.close()

    calls = as_permissions(fake_only.requests_of("scheduler"))
    assert calls <= granted(), f"used but not granted: {calls - granted()}"
    assert granted() <= calls, f"granted but never used: {granted() - calls}"


def test_the_scheduler_may_bind_only_the_tenant_cluster_role():
    role = next(d for d in rbac_documents() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "gpu-marketplace-scheduler")
    bind_rules = [rule for rule in role["rules"] if "bind" in rule["verbs"] or "escalate" in rule["verbs"]]
    assert bind_rules == [{"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                           "resourceNames": [manifests.TENANT_CLUSTER_ROLE], "verbs": ["bind"]}]
    assert any(d["kind"] == "ClusterRole" and d["metadata"]["name"] == manifests.TENANT_CLUSTER_ROLE for d in rbac_documents())
