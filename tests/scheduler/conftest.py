"""Fixtures for the Kubernetes driver tests: the same tests run against the fake API server in
``tests/k8s_fake`` and, when ``K8S_TEST_KUBECONFIG`` names one, a real cluster.

On a real cluster the tests create their own Node objects (no kubelet: their status is written
through the ``status`` subresource, and pods bound to them stay Pending) under unique names, and
delete everything they created afterwards.
"""

import os
import time
import uuid
from collections.abc import Iterator

import pytest

from marketplace.metrics import KUBERNETES_REQUESTS
from scheduler.driver import GiveUp, PoolSpec, TenantSpec, namespace_for
from scheduler.kube import KubeApi, NotFound, RetryPolicy
from scheduler.kube_driver import KubernetesDriver
from tests.k8s_fake import FakeKube, node_manifest, pod_manifest

PREFIX = "gpu.marketplace.io"
# Small timeouts and backoff: failures are injected on purpose and must not slow the suite down.
FAST_POLICY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, connect_timeout=2.0, read_timeout=2.0)
REAL_KUBECONFIG = os.environ.get("K8S_TEST_KUBECONFIG", "")


class Cluster:
    """Arrange and inspect a cluster through the project's own adapter (the driver under test is
    built separately, so a test only asserts objects on the server)."""

    def __init__(self, api: KubeApi, driver: KubernetesDriver, fake: FakeKube | None, kubeconfig: str) -> None:
        self.api, self.driver, self.fake, self.kubeconfig = api, driver, fake, kubeconfig
        self.real = fake is None
        self.uid = uuid.uuid4().hex[:6]
        self.nodes: list[str] = []
        self.namespaces: list[str] = []

    # --- names and specs ------------------------------------------------------------------------
    def name(self, stem: str) -> str:
        return f"{stem}-{self.uid}"

    def tenant(self, slug: str = "acme", gpus: int = 16) -> TenantSpec:
        slug = self.name(slug)
        self.namespaces.append(namespace_for(slug))
        return TenantSpec(cluster="test", tenant=slug, group=f"tenant:{slug}", namespace=namespace_for(slug),
                          gpus=gpus, label_prefix=PREFIX)

    def pool(self, nodes: list[str], tenant: TenantSpec, pool: str = "pool", gpus_per_node: int = 8) -> PoolSpec:
        return PoolSpec(cluster="test", pool=self.name(pool), reservation_id="1", tenant=tenant.tenant,
                        namespace=tenant.namespace, nodes=tuple(nodes), gpus_per_node=gpus_per_node, label_prefix=PREFIX)

    # --- arrange --------------------------------------------------------------------------------
    def add_node(self, stem: str, *, gpus: int = 8, ready: bool = True, labels: dict | None = None,
                 taints: list | None = None, hostname_label: bool = True) -> str:
        name = self.name(stem)
        manifest = node_manifest(name, gpus=gpus, ready=ready, labels=labels, taints=taints, hostname_label=hostname_label)
        status = manifest.pop("status")
        self.api.call("create", self.api.core.create_node, manifest)
        self.nodes.append(name)
        self.api.call("patch", self.api.core.patch_node_status, name, {"status": status})
        # A real API server's TaintNodesByCondition admission adds node.kubernetes.io/not-ready to a
        # new node until the node controller sees it Ready; start from exactly the taints asked for.
        self.api.call("patch", self.api.core.patch_node, name, {"spec": {"taints": manifest["spec"]["taints"]}})
        return name

    def set_node_status(self, name: str, *, ready: bool | None = None, gpus: int | None = None) -> None:
        status: dict = {}
        if ready is not None:
            status["conditions"] = node_manifest(name, ready=ready)["status"]["conditions"]
        if gpus is not None:
            status["allocatable"] = {"nvidia.com/gpu": str(gpus)}
        self.api.call("patch", self.api.core.patch_node_status, name, {"status": status})

    def patch_node(self, name: str, patch: dict | list) -> None:
        self.api.call("patch", self.api.core.patch_node, name, patch)

    def ensure_namespace(self, name: str) -> None:
        try:
            self.api.call("create", self.api.core.create_namespace, {"metadata": {"name": name}})
        except GiveUp:
            pass  # exists
        if name not in self.namespaces:
            self.namespaces.append(name)

    def add_pod(self, namespace: str, stem: str, node: str) -> str:
        self.ensure_namespace(namespace)
        name = self.name(stem)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.api.call("create", self.api.core.create_namespaced_pod, namespace, pod_manifest(namespace, name, node))
                return name
            except GiveUp as exc:
                # A fresh namespace's "default" ServiceAccount appears a moment after the namespace.
                if "serviceaccount" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # --- inspect --------------------------------------------------------------------------------
    def node(self, name: str) -> dict | None:
        try:
            return self.api.call("get", self.api.core.read_node, name)
        except NotFound:
            return None

    def read(self, method, *args) -> dict | None:
        try:
            return self.api.call("get", method, *args)
        except NotFound:
            return None

    def pods(self, namespace: str) -> list[dict]:
        try:
            return self.api.list_all("list", self.api.core.list_namespaced_pod, namespace)
        except NotFound:
            return []

    def writes(self) -> float:
        """Write requests the driver under test has sent so far (from the request metric, so it
        works on a real cluster too)."""
        total = 0.0
        for metric in KUBERNETES_REQUESTS.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["cluster"] == "test" \
                        and sample.labels["verb"] in {"create", "update", "patch", "delete", "evict"}:
                    total += sample.value
        return total

    def cleanup(self) -> None:
        for name in self.nodes:
            try:
                self.api.call("delete", self.api.core.delete_node, name)
            except GiveUp:
                pass
        for namespace in self.namespaces:
            for pod in self.pods(namespace):
                try:
                    self.api.call("delete", self.api.core.delete_namespaced_pod, pod["metadata"]["name"], namespace,
                                  grace_period_seconds=0)
                except GiveUp:
                    pass
            try:
                self.api.call("delete", self.api.core.delete_namespace, namespace)
            except GiveUp:
                pass


@pytest.fixture
def fake_kube(tmp_path) -> Iterator[FakeKube]:
    fake = FakeKube().start()
    yield fake
    fake.stop()


@pytest.fixture(params=["fake", "real"])
def cluster(request, tmp_path) -> Iterator[Cluster]:
    if request.param == "real":
        if not REAL_KUBECONFIG:
            pytest.skip("set K8S_TEST_KUBECONFIG to run the driver tests against a real cluster")
        kubeconfig, fake = REAL_KUBECONFIG, None
    else:
        fake = request.getfixturevalue("fake_kube")
        kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")
    policy = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, connect_timeout=5.0, read_timeout=10.0) \
        if fake is None else FAST_POLICY
    api = KubeApi.from_kubeconfig("test-arrange", kubeconfig, policy=policy)
    driver = KubernetesDriver.from_kubeconfig(kubeconfig, cluster="test", policy=policy, workers=4)
    harness = Cluster(api, driver, fake, kubeconfig)
    yield harness
    harness.cleanup()
    api.close()
    driver.api.close()


@pytest.fixture
def fake_only(cluster: Cluster) -> FakeKube:
    """The fake server behind ``cluster``; skips on a real cluster (fault injection, request log)."""
    if cluster.fake is None:
        pytest.skip("needs the fake API server (fault injection / request log)")
    return cluster.fake
