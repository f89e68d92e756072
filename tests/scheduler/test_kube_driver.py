"""The Kubernetes driver against an API server (the fake one, or a real cluster with
K8S_TEST_KUBECONFIG), through the real ``kubernetes`` client. Assertions are on the server's objects."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from scheduler.driver import GiveUp, RetryLater
from scheduler.kube import RetryPolicy
from scheduler.kube_driver import KubernetesDriver
from tests.scheduler.conftest import PREFIX

POOL_KEY, TENANT_KEY = f"{PREFIX}/pool", f"{PREFIX}/tenant"


def taints_of(node: dict) -> list[dict]:
    return [{k: t[k] for k in ("key", "value", "effect") if k in t} for t in node["spec"].get("taints") or []]


def resource_versions(cluster, names: list[str]) -> dict[str, str]:
    return {name: cluster.node(name)["metadata"]["resourceVersion"] for name in names}


class TestProvision:
    def test_apply_pool_labels_taints_and_uncordons_every_node_keeping_other_taints(self, cluster):
        # Given two nodes, one cordoned and carrying someone else's taint
        other_taint = {"key": "example.com/maintenance-window", "value": "soon", "effect": "PreferNoSchedule"}
        a = cluster.add_node("gpu-a", taints=[other_taint])
        b = cluster.add_node("gpu-b")
        cluster.patch_node(b, {"spec": {"unschedulable": True}})
        tenant = cluster.tenant()
        pool = cluster.pool([a, b], tenant)

        # When the pool is applied
        cluster.driver.apply_pool(pool)

        # Then both nodes carry the pool and tenant labels and the tenant taint, and are schedulable
        for name in (a, b):
            node = cluster.node(name)
            assert node["metadata"]["labels"][POOL_KEY] == pool.pool
            assert node["metadata"]["labels"][TENANT_KEY] == tenant.tenant
            assert {"key": TENANT_KEY, "value": tenant.tenant, "effect": "NoSchedule"} in taints_of(node)
            assert not node["spec"].get("unschedulable", False)
        assert other_taint in taints_of(cluster.node(a))

    def test_ensure_tenant_creates_namespace_quota_limits_policy_and_binding(self, cluster):
        tenant = cluster.tenant(gpus=16)

        cluster.driver.ensure_tenant(tenant)

        core, net, rbac = cluster.api.core, cluster.api.networking, cluster.api.rbac
        ns = cluster.read(core.read_namespace, tenant.namespace)
        assert ns["metadata"]["labels"][TENANT_KEY] == tenant.tenant
        # no privileged or host-path pods: root on a node the next tenant gets
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"
        annotations = ns["metadata"]["annotations"]
        assert annotations["scheduler.alpha.kubernetes.io/node-selector"] == f"{TENANT_KEY}={tenant.tenant}"
        assert json.loads(annotations["scheduler.alpha.kubernetes.io/defaultTolerations"]) == [
            {"key": TENANT_KEY, "operator": "Equal", "value": tenant.tenant, "effect": "NoSchedule"}]
        quota = cluster.read(core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)
        assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "16"}
        limits = cluster.read(core.read_namespaced_limit_range, "defaults", tenant.namespace)
        assert limits["spec"]["limits"][0]["defaultRequest"]["memory"] == "4Gi"
        policy = cluster.read(net.read_namespaced_network_policy, "deny-other-namespaces", tenant.namespace)
        assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {}}]}]
        binding = cluster.read(rbac.read_namespaced_role_binding, "tenant", tenant.namespace)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": "gpu-marketplace-tenant"}
        assert binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": tenant.group}]

    def test_ensure_tenant_with_zero_gpus_deletes_the_tenant_objects(self, cluster):
        tenant = cluster.tenant(gpus=8)
        cluster.driver.ensure_tenant(tenant)

        cluster.driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 0}))

        core = cluster.api.core
        assert cluster.read(cluster.api.rbac.read_namespaced_role_binding, "tenant", tenant.namespace) is None
        ns = cluster.read(core.read_namespace, tenant.namespace)
        assert ns is None or ns["status"]["phase"] == "Terminating"  # a real server empties it first
        # Removing again (already gone / being deleted) is success.
        cluster.driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 0}))

    def test_a_tenant_coming_back_while_its_namespace_is_being_deleted_is_retry_later(self, cluster, fake_only):
        fake_only.namespaces_vanish_at_once = False  # like the real namespace controller
        tenant = cluster.tenant(gpus=8)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 0}))

        with pytest.raises(RetryLater, match="being deleted"):
            cluster.driver.ensure_tenant(tenant)

        fake_only.finish_namespace_deletions()
        cluster.driver.ensure_tenant(tenant)
        quota = cluster.read(cluster.api.core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)
        assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "8"}

    def test_creating_in_a_namespace_being_deleted_is_retry_later(self, cluster, fake_only):
        fake_only.namespaces_vanish_at_once = False
        cluster.ensure_namespace("doomed-" + cluster.uid)
        cluster.api.call("delete", cluster.api.core.delete_namespace, "doomed-" + cluster.uid)

        with pytest.raises(RetryLater, match="being terminated"):
            cluster.driver.post_event(namespace="doomed-" + cluster.uid, name="x", reason="R", message="m")

    def test_zero_gpus_never_deletes_a_namespace_the_marketplace_does_not_manage(self, cluster):
        tenant = cluster.tenant()
        cluster.ensure_namespace(tenant.namespace)

        with pytest.raises(GiveUp, match="not managed"):
            cluster.driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 0}))

        assert cluster.read(cluster.api.core.read_namespace, tenant.namespace) is not None

    def test_post_event_twice_is_one_event(self, cluster):
        tenant = cluster.tenant()
        cluster.driver.ensure_tenant(tenant)

        for _ in range(2):
            cluster.driver.post_event(namespace=tenant.namespace, name="reservation-1-ending",
                                      reason="ReservationEnding", message="Your reservation ends in 30 minutes.")

        events = cluster.api.list_all("list", cluster.api.core.list_namespaced_event, tenant.namespace,
                                      field_selector="reason=ReservationEnding")
        assert [(e["metadata"]["name"], e["message"]) for e in events] == [
            ("reservation-1-ending", "Your reservation ends in 30 minutes.")]


class TestIdempotence:
    def test_applying_twice_changes_nothing(self, cluster):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(3)]
        tenant = cluster.tenant()
        pool = cluster.pool(nodes, tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)
        before = {name: cluster.node(name) for name in nodes}
        writes = cluster.writes()

        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)

        # Nothing was written (on a real cluster controllers may still bump resourceVersions).
        assert cluster.writes() == writes
        for name in nodes:
            after = cluster.node(name)
            assert after["metadata"]["labels"] == before[name]["metadata"]["labels"]
            assert taints_of(after) == taints_of(before[name])

    def test_same_resource_versions_after_a_second_apply(self, cluster, fake_only):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(3)]
        tenant = cluster.tenant()
        pool = cluster.pool(nodes, tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)
        before = resource_versions(cluster, nodes)
        objects_before = {(plural, ns, name): obj["metadata"]["resourceVersion"]
                          for (plural, ns, name), obj in fake_only.objects.items()}

        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)

        assert resource_versions(cluster, nodes) == before
        assert {key: obj["metadata"]["resourceVersion"] for key, obj in fake_only.objects.items()} == objects_before

    def test_two_workers_applying_the_same_pool_at_once_end_in_the_same_state(self, cluster):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(6)]
        tenant = cluster.tenant()
        pool = cluster.pool(nodes, tenant)
        second = KubernetesDriver.from_kubeconfig(cluster.kubeconfig, cluster="test", policy=cluster.driver.api.policy)

        with ThreadPoolExecutor(2) as workers:
            for future in [workers.submit(driver.apply_pool, pool) for driver in (cluster.driver, second)]:
                future.result()
            for future in [workers.submit(driver.ensure_tenant, tenant) for driver in (cluster.driver, second)]:
                future.result()
        second.api.close()

        for name in nodes:
            node = cluster.node(name)
            assert node["metadata"]["labels"][POOL_KEY] == pool.pool
            assert taints_of(node) == [{"key": TENANT_KEY, "value": tenant.tenant, "effect": "NoSchedule"}]
        assert cluster.read(cluster.api.core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)

    def test_second_apply_sends_no_writes(self, cluster, fake_only):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(4)]
        tenant = cluster.tenant()
        pool = cluster.pool(nodes, tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)
        fake_only.reset_log()

        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)

        assert fake_only.count("PATCH") == fake_only.count("POST") == fake_only.count("PUT") == 0

    def test_provision_costs_one_list_and_one_patch_per_node(self, cluster, fake_only):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(10)]
        pool = cluster.pool(nodes, cluster.tenant())
        fake_only.reset_log()

        cluster.driver.apply_pool(pool)

        assert fake_only.count("GET", "/api/v1/nodes") == 1
        assert fake_only.count("PATCH", "/api/v1/nodes/") == 10
        assert len(fake_only.log) == 11

    def test_releasing_again_costs_a_few_lists_not_a_request_per_node(self, cluster, fake_only):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(8)]
        pool = cluster.pool(nodes, cluster.tenant())
        cluster.driver.apply_pool(pool)
        cluster.driver.drain_pool(pool, force=True)
        cluster.driver.unlabel_pool(pool)
        fake_only.reset_log()

        cluster.driver.drain_pool(pool, force=True)
        cluster.driver.unlabel_pool(pool)

        # per call: the pool-label LIST and one hostname LIST (drain adds the tenant's pod LIST)
        assert fake_only.count("GET", "/api/v1/nodes?") == 4
        assert len(fake_only.log) == 5
        assert fake_only.count("GET", "/api/v1/nodes/") == fake_only.count("PATCH") == 0

    def test_a_drain_repeated_after_release_leaves_the_nodes_schedulable(self, cluster):
        nodes = [cluster.add_node(f"gpu-{i}") for i in range(2)]
        pool = cluster.pool(nodes, cluster.tenant())
        cluster.driver.apply_pool(pool)
        cluster.driver.drain_pool(pool, force=True)
        cluster.driver.unlabel_pool(pool)

        cluster.driver.drain_pool(pool, force=True)  # a late, repeated task

        assert not any(cluster.node(name)["spec"].get("unschedulable") for name in nodes)

    def test_a_node_without_the_hostname_label_is_read_by_name(self, cluster):
        odd = cluster.add_node("gpu-odd", hostname_label=False)
        pool = cluster.pool([odd], cluster.tenant())

        cluster.driver.apply_pool(pool)

        assert cluster.node(odd)["metadata"]["labels"][POOL_KEY] == pool.pool


class TestDriftRepair:
    def test_label_and_taint_removed_by_hand_are_reapplied(self, cluster):
        node = cluster.add_node("gpu-a")
        tenant = cluster.tenant()
        pool = cluster.pool([node], tenant)
        cluster.driver.apply_pool(pool)
        cluster.patch_node(node, {"metadata": {"labels": {POOL_KEY: None}}, "spec": {"taints": []}})

        cluster.driver.apply_pool(pool)

        repaired = cluster.node(node)
        assert repaired["metadata"]["labels"][POOL_KEY] == pool.pool
        assert taints_of(repaired) == [{"key": TENANT_KEY, "value": tenant.tenant, "effect": "NoSchedule"}]

    def test_quota_edited_by_hand_is_reset(self, cluster):
        tenant = cluster.tenant(gpus=16)
        cluster.driver.ensure_tenant(tenant)
        core = cluster.api.core
        cluster.api.call("patch", core.patch_namespaced_resource_quota, "gpu-quota", tenant.namespace,
                         {"spec": {"hard": {"requests.nvidia.com/gpu": "999", "pods": "5"}}})

        cluster.driver.ensure_tenant(tenant)

        quota = cluster.read(core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)
        assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "16"}

    def test_a_limit_added_to_the_quota_by_hand_is_removed(self, cluster):
        tenant = cluster.tenant(gpus=16)
        cluster.driver.ensure_tenant(tenant)
        core = cluster.api.core
        cluster.api.call("patch", core.patch_namespaced_resource_quota, "gpu-quota", tenant.namespace,
                         {"spec": {"hard": {"pods": "5"}}})

        cluster.driver.ensure_tenant(tenant)

        quota = cluster.read(core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)
        assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "16"}

    def test_a_binding_to_another_role_is_replaced(self, cluster, fake_only):
        # (fake only: roleRef is immutable, so only a delete and re-create by hand could do this)
        tenant = cluster.tenant()
        cluster.driver.ensure_tenant(tenant)
        fake_only.objects[("rolebindings", tenant.namespace, "tenant")]["roleRef"]["name"] = "cluster-admin"

        cluster.driver.ensure_tenant(tenant)

        binding = cluster.read(cluster.api.rbac.read_namespaced_role_binding, "tenant", tenant.namespace)
        assert binding["roleRef"]["name"] == "gpu-marketplace-tenant"

    def test_quota_follows_the_tenants_gpus(self, cluster):
        tenant = cluster.tenant(gpus=16)
        cluster.driver.ensure_tenant(tenant)

        cluster.driver.ensure_tenant(tenant.__class__(**{**tenant.__dict__, "gpus": 8}))

        quota = cluster.read(cluster.api.core.read_namespaced_resource_quota, "gpu-quota", tenant.namespace)
        assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "8"

    def test_namespace_annotation_removed_by_hand_is_restored_and_foreign_labels_kept(self, cluster):
        tenant = cluster.tenant()
        cluster.driver.ensure_tenant(tenant)
        cluster.api.call("patch", cluster.api.core.patch_namespace, tenant.namespace, {"metadata": {
            "annotations": {"scheduler.alpha.kubernetes.io/node-selector": None}, "labels": {"team": "ml"}}})

        cluster.driver.ensure_tenant(tenant)

        ns = cluster.read(cluster.api.core.read_namespace, tenant.namespace)
        assert ns["metadata"]["annotations"]["scheduler.alpha.kubernetes.io/node-selector"] == f"{TENANT_KEY}={tenant.tenant}"
        assert ns["metadata"]["labels"]["team"] == "ml"

    def test_a_conflicting_write_makes_the_driver_read_again_and_keep_other_taints(self, cluster, fake_only):
        # Given a node with someone else's taint, and a write racing the driver's guarded PATCH
        # (the injected 409 stands in for the race: the first PATCH is refused as stale)
        node = cluster.add_node("gpu-a")
        pool = cluster.pool([node], cluster.tenant())
        cluster.patch_node(node, {"spec": {"taints": [{"key": "other", "effect": "NoExecute"}]}})
        fake_only.fail("PATCH", f"/api/v1/nodes/{node}$", 409, times=1)

        cluster.driver.apply_pool(pool)

        keys = [t["key"] for t in taints_of(cluster.node(node))]
        assert sorted(keys) == sorted(["other", TENANT_KEY])


class TestStaleWrites:
    def test_a_patch_with_a_stale_resource_version_is_a_conflict(self, cluster):
        node = cluster.add_node("gpu-a")
        stale = cluster.node(node)["metadata"]["resourceVersion"]
        cluster.patch_node(node, {"metadata": {"labels": {"x": "1"}}})

        with pytest.raises(RetryLater):
            cluster.patch_node(node, {"metadata": {"labels": {"x": "2"}, "resourceVersion": stale}})

        assert cluster.node(node)["metadata"]["labels"]["x"] == "1"


class TestReadiness:
    def provisioned(self, cluster, count=2, **node_options):
        nodes = [cluster.add_node(f"gpu-{i}", **node_options) for i in range(count)]
        tenant = cluster.tenant()
        pool = cluster.pool(nodes, tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)
        return nodes, tenant, pool

    def test_passes_for_a_ready_isolated_pool_with_the_tenants_own_pods(self, cluster):
        nodes, tenant, pool = self.provisioned(cluster)
        cluster.add_pod(tenant.namespace, "train", nodes[0])

        result = cluster.driver.check_pool(pool)

        assert result.passed, result.problems
        assert result.nodes[nodes[0]] == {"exists": True, "ready": True, "gpus": 8, "schedulable": True,
                                          "labels_ok": True, "taint_ok": True, "foreign_pods": 0}

    def test_fails_for_a_not_ready_node(self, cluster):
        nodes, _, pool = self.provisioned(cluster)
        cluster.set_node_status(nodes[1], ready=False)

        result = cluster.driver.check_pool(pool)

        assert not result.passed
        assert result.problems == [f"node {nodes[1]} is not Ready"]
        assert result.nodes[nodes[1]]["ready"] is False

    def test_fails_for_missing_gpus(self, cluster):
        nodes, _, pool = self.provisioned(cluster)
        cluster.set_node_status(nodes[0], gpus=6)

        result = cluster.driver.check_pool(pool)

        assert result.problems == [f"node {nodes[0]} reports 6 allocatable GPUs, expected 8"]

    def test_fails_for_a_pod_of_another_tenant(self, cluster):
        nodes, _, pool = self.provisioned(cluster)
        intruder = cluster.add_pod(cluster.name("other-tenant"), "squatter", nodes[0])

        result = cluster.driver.check_pool(pool)

        assert not result.passed
        assert result.nodes[nodes[0]]["foreign_pods"] == 1
        assert result.problems == [f"node {nodes[0]} runs pods of others (1)"]
        # and the other tenant's namespace and pod names are nowhere in what this tenant is shown
        shown = json.dumps(result.as_json())
        assert intruder not in shown and cluster.name("other-tenant") not in shown

    def test_daemonset_pods_do_not_count_as_foreign(self, cluster, fake_only):
        # (fake only: on a real cluster the garbage collector removes a pod whose owner is made up)
        nodes, _, pool = self.provisioned(cluster)
        fake_only.add_pod("monitoring", "dcgm-exporter-x", nodes[0], owner_kind="DaemonSet")

        assert cluster.driver.check_pool(pool).passed

    def test_fails_for_labels_removed_and_a_node_that_disappeared(self, cluster):
        nodes, _, pool = self.provisioned(cluster)
        cluster.patch_node(nodes[0], {"metadata": {"labels": {POOL_KEY: None}}})
        cluster.api.call("delete", cluster.api.core.delete_node, nodes[1])

        result = cluster.driver.check_pool(pool)

        assert result.nodes[nodes[0]]["labels_ok"] is False
        assert result.nodes[nodes[1]] == {"exists": False}
        assert f"node {nodes[1]} does not exist" in result.problems

    def test_observe_nodes_reports_state_and_absence(self, cluster):
        node = cluster.add_node("gpu-a", gpus=4)
        missing = cluster.name("gpu-never-existed")

        states = cluster.driver.observe_nodes([node, missing])

        assert states[node].exists and states[node].ready and states[node].gpus == 4
        assert states[missing].exists is False


class TestRelease:
    def test_drain_evicts_the_tenants_pods_then_force_deletes_them(self, cluster):
        node = cluster.add_node("gpu-a")
        tenant = cluster.tenant()
        pool = cluster.pool([node], tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.driver.apply_pool(pool)
        pods = [cluster.add_pod(tenant.namespace, f"worker-{i}", node) for i in range(2)]
        other = cluster.add_pod(cluster.name("bystander"), "keep-me", cluster.add_node("gpu-elsewhere"))

        # Eviction: pods bound to a node terminate gracefully; without a kubelet they stay terminating.
        remaining = cluster.driver.drain_pool(pool, force=False)

        assert cluster.node(node)["spec"]["unschedulable"] is True
        terminating = cluster.pods(tenant.namespace)
        assert remaining == len(terminating) == 2
        assert all(p["metadata"].get("deletionTimestamp") for p in terminating)

        # After the grace period: force-delete.
        assert cluster.driver.drain_pool(pool, force=True) == 0
        assert cluster.pods(tenant.namespace) == []
        assert [p["metadata"]["name"] for p in cluster.pods(cluster.name("bystander"))] == [other]
        assert len(pods) == 2

    def test_evicted_pods_are_gone_once_the_kubelet_confirms(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        tenant = cluster.tenant()
        pool = cluster.pool([node], tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.add_pod(tenant.namespace, "worker", node)
        cluster.driver.drain_pool(pool, force=False)

        fake_only.finish_terminations()

        assert cluster.driver.drain_pool(pool, force=False) == 0

    def test_unlabel_removes_only_this_pools_marks_and_uncordons(self, cluster):
        other_taint = {"key": "example.com/keep", "value": "yes", "effect": "NoSchedule"}
        mine = cluster.add_node("gpu-mine", taints=[other_taint])
        handed_over = cluster.add_node("gpu-next")
        tenant, next_tenant = cluster.tenant("acme"), cluster.tenant("nimbus")
        pool = cluster.pool([mine, handed_over], tenant, pool="old")
        cluster.driver.apply_pool(pool)
        # The second node already belongs to the next pool.
        next_pool = cluster.pool([handed_over], next_tenant, pool="next")
        cluster.driver.apply_pool(next_pool)
        cluster.driver.drain_pool(pool, force=True)

        cluster.driver.unlabel_pool(pool)

        released = cluster.node(mine)
        assert POOL_KEY not in released["metadata"]["labels"] and TENANT_KEY not in released["metadata"]["labels"]
        assert taints_of(released) == [other_taint]
        assert not released["spec"].get("unschedulable", False)
        kept = cluster.node(handed_over)
        assert kept["metadata"]["labels"][POOL_KEY] == next_pool.pool
        assert {"key": TENANT_KEY, "value": next_tenant.tenant, "effect": "NoSchedule"} in taints_of(kept)
        assert not kept["spec"].get("unschedulable", False)

    def test_unlabel_cleans_a_taint_left_behind_when_the_label_was_removed_by_hand(self, cluster):
        node = cluster.add_node("gpu-a")
        pool = cluster.pool([node], cluster.tenant())
        cluster.driver.apply_pool(pool)
        cluster.patch_node(node, {"metadata": {"labels": {POOL_KEY: None}}})

        cluster.driver.unlabel_pool(pool)

        assert taints_of(cluster.node(node)) == []

    def test_release_of_a_pool_whose_node_is_gone_completes(self, cluster):
        nodes = [cluster.add_node("gpu-a"), cluster.add_node("gpu-b")]
        pool = cluster.pool(nodes, cluster.tenant())
        cluster.driver.apply_pool(pool)
        cluster.api.call("delete", cluster.api.core.delete_node, nodes[1])

        assert cluster.driver.drain_pool(pool, force=True) == 0
        cluster.driver.unlabel_pool(pool)

        assert POOL_KEY not in cluster.node(nodes[0])["metadata"]["labels"]


class TestErrors:
    def test_retries_500_and_429_then_succeeds(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        pool = cluster.pool([node], cluster.tenant())
        fake_only.fail("GET", "^/api/v1/nodes$", 500, times=1)
        fake_only.fail("PATCH", f"/api/v1/nodes/{node}$", 429, times=1)
        fake_only.reset_log()

        cluster.driver.apply_pool(pool)

        assert cluster.node(node)["metadata"]["labels"][POOL_KEY] == pool.pool
        assert fake_only.count("GET", "/api/v1/nodes?") == 2
        assert fake_only.count("PATCH", f"/api/v1/nodes/{node}") == 2

    def test_persistent_5xx_is_retry_later(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        fake_only.fail("PATCH", "/api/v1/nodes/", 503, times=10)
        fake_only.reset_log()

        with pytest.raises(RetryLater, match="503"):
            cluster.driver.apply_pool(cluster.pool([node], cluster.tenant()))

        assert fake_only.count("PATCH") == 3  # bounded: the policy's attempts

    def test_forbidden_is_give_up(self, cluster, fake_only):
        tenant = cluster.tenant()
        fake_only.fail("POST", "/rolebindings$", 403, times=1)

        with pytest.raises(GiveUp, match="403"):
            cluster.driver.ensure_tenant(tenant)

    def test_an_invalid_object_is_give_up(self, cluster):
        node = cluster.add_node("gpu-a")
        tenant = cluster.tenant()
        bad = cluster.pool([node], tenant).__class__(
            **{**cluster.pool([node], tenant).__dict__, "pool": "not a valid label value!"})

        with pytest.raises(GiveUp, match="422"):
            cluster.driver.apply_pool(bad)

    def test_a_request_hanging_past_the_timeout_is_retry_later(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        fake_only.delay("GET", "^/api/v1/nodes", 1.0, times=2)
        impatient = KubernetesDriver.from_kubeconfig(
            cluster.kubeconfig, cluster="test",
            policy=RetryPolicy(attempts=2, backoff=0.01, max_backoff=0.01, connect_timeout=1.0, read_timeout=0.2))

        with pytest.raises(RetryLater, match="timed out"):
            impatient.observe_nodes([node])

    def test_a_node_that_disappeared_is_give_up_on_apply(self, cluster):
        nodes = [cluster.add_node("gpu-a"), cluster.add_node("gpu-b")]
        pool = cluster.pool(nodes, cluster.tenant())
        cluster.api.call("delete", cluster.api.core.delete_node, nodes[1])

        with pytest.raises(GiveUp, match=f"{nodes[1]}.*does not exist"):
            cluster.driver.apply_pool(pool)

        # The nodes that exist were still applied.
        assert cluster.node(nodes[0])["metadata"]["labels"][POOL_KEY] == pool.pool

    def test_a_node_deleted_between_list_and_patch_is_give_up(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        pool = cluster.pool([node], cluster.tenant())
        fake_only.fail("PATCH", f"/api/v1/nodes/{node}$", 404, times=1)

        with pytest.raises(GiveUp):
            cluster.driver.apply_pool(pool)


class TestEvictionRefused:
    def test_an_eviction_a_disruption_budget_refuses_counts_as_remaining_and_is_not_retried(self, cluster, fake_only):
        node = cluster.add_node("gpu-a")
        tenant = cluster.tenant()
        pool = cluster.pool([node], tenant)
        cluster.driver.ensure_tenant(tenant)
        cluster.add_pod(tenant.namespace, "guarded", node)
        fake_only.fail("POST", "/eviction$", 429, times=5)  # what the server answers when a PDB forbids it
        fake_only.reset_log()

        remaining = cluster.driver.drain_pool(pool, force=False)

        assert remaining == 1
        assert fake_only.count("POST", "/eviction") == 1
        assert not cluster.pods(tenant.namespace)[0]["metadata"].get("deletionTimestamp")
        assert cluster.driver.drain_pool(pool, force=True) == 0


def test_a_node_name_too_long_for_a_label_selector_is_read_by_name(cluster):
    long_stem = "gpu-" + "x" * 70
    node = cluster.add_node(long_stem, hostname_label=False)
    pool = cluster.pool([node, node], cluster.tenant())  # listed twice: patched once

    cluster.driver.apply_pool(pool)

    assert cluster.node(node)["metadata"]["labels"][POOL_KEY] == pool.pool
