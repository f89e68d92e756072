"""Which driver serves a cluster, the plan-only driver, and the adapter's client cache and metrics."""

import pytest

from marketplace.metrics import KUBERNETES_REQUESTS
from marketplace.pools.models import PlannedOperation
from scheduler import manifests
from scheduler.driver import GiveUp, PoolSpec, TenantSpec
from scheduler.drivers import driver_for
from scheduler.kube_driver import KubernetesDriver
from scheduler.plan_driver import PlanDriver
from tests.factories import ClusterFactory

TENANT = TenantSpec(cluster="c1", tenant="acme", group="tenant:acme", namespace="tenant-acme", gpus=16,
                    label_prefix="gpu.marketplace.io")
POOL = PoolSpec(cluster="c1", pool="r-1", reservation_id=None, tenant="acme", namespace="tenant-acme",
                nodes=("n1", "n2"), gpus_per_node=8, label_prefix="gpu.marketplace.io")


class TestDriverFor:
    def test_a_kubeconfig_cluster_gets_the_kubernetes_driver_on_its_server(self, db, fake_kube, tmp_path):
        fake_kube.add_node("n1")
        cluster = ClusterFactory(name="c1", connection="kubeconfig",
                                 kubeconfig_path=fake_kube.write_kubeconfig(tmp_path / "kc", context="ctx"),
                                 kube_context="ctx")

        driver = driver_for(cluster)

        assert isinstance(driver, KubernetesDriver)
        assert driver.observe_nodes(["n1"])["n1"].exists
        assert driver_for(cluster).api is driver.api  # one client per cluster

    def test_a_driver_can_be_built_from_a_url_and_token(self, fake_kube):
        fake_kube.add_node("n1", gpus=2)

        driver = KubernetesDriver.from_url(fake_kube.url, token="secret")

        assert driver.observe_nodes(["n1"])["n1"].gpus == 2
        assert fake_kube.requests_of("secret")
        with pytest.raises(GiveUp, match="not an http"):
            KubernetesDriver.from_url("localhost:6443")

    def test_a_tls_failure_is_give_up_without_retries(self, fake_kube):
        # The fake speaks plain HTTP: an https client fails the handshake, as with a wrong CA.
        driver = KubernetesDriver.from_url(fake_kube.url.replace("http://", "https://"))

        with pytest.raises(GiveUp, match="TLS"):
            driver.observe_nodes(["n1"])

    def test_a_plan_cluster_gets_the_plan_driver(self, db):
        assert isinstance(driver_for(ClusterFactory(name="c1", connection="plan")), PlanDriver)

    def test_an_unreadable_kubeconfig_is_give_up(self, db, tmp_path):
        cluster = ClusterFactory(name="c1", connection="kubeconfig", kubeconfig_path=str(tmp_path / "missing"))
        with pytest.raises(GiveUp, match="not readable"):
            driver_for(cluster)

    def test_a_missing_context_is_give_up(self, db, fake_kube, tmp_path):
        cluster = ClusterFactory(name="c1", connection="kubeconfig",
                                 kubeconfig_path=fake_kube.write_kubeconfig(tmp_path / "kc"), kube_context="nope")
        with pytest.raises(GiveUp, match="cannot load kubeconfig"):
            driver_for(cluster)

    def test_requests_are_counted_by_cluster_verb_and_outcome(self, db, fake_kube, tmp_path):
        cluster = ClusterFactory(name="metrics-c", connection="kubeconfig",
                                 kubeconfig_path=fake_kube.write_kubeconfig(tmp_path / "kc"))
        sample = lambda outcome: KUBERNETES_REQUESTS.labels(cluster="metrics-c", verb="get", outcome=outcome)._value.get()  # noqa: E731
        before_ok, before_missing = sample("ok"), sample("not_found")
        fake_kube.add_node("n1")

        driver_for(cluster).observe_nodes(["n1", "gone"])  # n1 listed; "gone" read by name: 404

        assert sample("not_found") == before_missing + 1
        assert sample("ok") == before_ok


class TestPlanDriver:
    def test_records_the_objects_and_patches_it_would_apply_once(self, db):
        ClusterFactory(name="c1", connection="plan")
        driver = PlanDriver("c1")

        for _ in range(2):
            driver.ensure_tenant(TENANT)
            driver.apply_pool(POOL)

        operations = list(PlannedOperation.objects.values_list("verb", "kind", "name"))
        assert operations == [
            ("apply", "Namespace", "tenant-acme"), ("apply", "ResourceQuota", "gpu-quota"),
            ("apply", "LimitRange", "defaults"), ("apply", "NetworkPolicy", "deny-other-namespaces"),
            ("apply", "RoleBinding", "tenant"), ("patch", "Node", "n1"), ("patch", "Node", "n2"),
        ]
        patch = PlannedOperation.objects.get(name="n1").body
        assert patch["metadata"]["labels"] == {"gpu.marketplace.io/pool": "r-1", "gpu.marketplace.io/tenant": "acme"}
        assert patch["spec"]["taints"] == [{"key": "gpu.marketplace.io/tenant", "value": "acme", "effect": "NoSchedule"}]

    def test_check_is_marked_plan_only_and_release_is_recorded(self, db):
        ClusterFactory(name="c1", connection="plan")
        driver = PlanDriver("c1")

        result = driver.check_pool(POOL)
        assert result.passed and result.plan_only and result.as_json()["plan_only"] is True
        assert driver.drain_pool(POOL, force=True) == 0
        driver.unlabel_pool(POOL)
        driver.ensure_tenant(TenantSpec(**{**TENANT.__dict__, "gpus": 0}))

        node_patches = [op.body for op in PlannedOperation.objects.filter(verb="patch", kind="Node", name="n1")]
        assert {"spec": {"unschedulable": True}} in node_patches
        assert manifests.node_release_patch(POOL) in node_patches
        assert PlannedOperation.objects.filter(verb="delete", kind="Namespace").count() == 1


class TestManifests:
    def test_pool_patch_keeps_other_taints_and_replaces_ours(self):
        current = [{"key": "other", "effect": "NoExecute"},
                   {"key": "gpu.marketplace.io/tenant", "value": "old", "effect": "NoSchedule"}]
        patch = manifests.node_pool_patch(POOL, current)
        assert patch["spec"]["taints"] == [{"key": "other", "effect": "NoExecute"}, manifests.pool_taint(POOL)]

    def test_release_patch_deletes_our_labels_with_null(self):
        patch = manifests.node_release_patch(POOL, [manifests.pool_taint(POOL)])
        assert patch == {"metadata": {"labels": {"gpu.marketplace.io/pool": None, "gpu.marketplace.io/tenant": None}},
                         "spec": {"unschedulable": False, "taints": []}}
