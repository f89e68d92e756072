"""The fake API server answers the real client the way kube-apiserver does (for what we use)."""

import json

import pytest

from scheduler.driver import GiveUp
from scheduler.kube import AlreadyExists, Conflict, KubeApi, NotFound, RetryPolicy
from tests.k8s_fake import FakeKube, node_manifest
from tests.k8s_fake.server import parse_label_selector, label_matches


@pytest.fixture
def api(fake_kube: FakeKube, tmp_path) -> KubeApi:
    client = KubeApi.from_kubeconfig("fake", fake_kube.write_kubeconfig(tmp_path / "kc"),
                                     policy=RetryPolicy(attempts=1, connect_timeout=2, read_timeout=2))
    yield client
    client.close()


def status_of(exc: GiveUp) -> dict:
    return json.loads(exc.__cause__.body)


class TestStatusBodies:
    def test_not_found(self, api):
        with pytest.raises(NotFound) as caught:
            api.call("get", api.core.read_node, "nope")
        assert status_of(caught.value) == {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": 'nodes "nope" not found', "reason": "NotFound",
            "details": {"name": "nope", "group": "", "kind": "nodes"}, "code": 404}

    def test_already_exists_and_invalid(self, api):
        api.call("create", api.core.create_namespace, {"metadata": {"name": "a"}})
        with pytest.raises(AlreadyExists) as caught:
            api.call("create", api.core.create_namespace, {"metadata": {"name": "a"}})
        assert status_of(caught.value)["reason"] == "AlreadyExists"
        with pytest.raises(GiveUp) as caught:
            api.call("create", api.core.create_namespace, {"metadata": {}})
        body = status_of(caught.value)
        assert (body["code"], body["reason"], body["details"]["causes"][0]["field"]) == (422, "Invalid", "metadata.name")

    def test_namespaced_objects_need_their_namespace(self, api):
        with pytest.raises(NotFound, match="namespaces .*ghost.* not found"):
            api.call("create", api.core.create_namespaced_limit_range, "ghost", {"metadata": {"name": "x"}, "spec": {"limits": []}})


class TestWrites:
    def test_every_write_bumps_the_resource_version_and_stale_ones_conflict(self, api, fake_kube):
        fake_kube.add_node("n1")
        first = api.call("get", api.core.read_node, "n1")["metadata"]["resourceVersion"]
        second = api.call("patch", api.core.patch_node, "n1", {"metadata": {"labels": {"a": "1"}}})["metadata"]["resourceVersion"]
        assert int(second) > int(first)
        with pytest.raises(Conflict):
            api.call("patch", api.core.patch_node, "n1", {"metadata": {"labels": {"a": "2"}, "resourceVersion": first}})
        node = api.call("get", api.core.read_node, "n1")
        node["metadata"]["resourceVersion"] = first
        with pytest.raises(Conflict):
            api.call("update", api.core.replace_node, "n1", node)

    def test_patch_types(self, api, fake_kube):
        fake_kube.add_node("n1", taints=[{"key": "a", "effect": "NoSchedule"}], labels={"x": "1", "y": "2"})
        # strategic merge: null deletes a label; taints are replaced whole
        api.call("patch", api.core.patch_node, "n1", {"metadata": {"labels": {"x": None}},
                                                      "spec": {"taints": [{"key": "b", "effect": "NoSchedule"}]}})
        node = fake_kube.get("nodes", "n1")
        assert "x" not in node["metadata"]["labels"] and node["metadata"]["labels"]["y"] == "2"
        assert node["spec"]["taints"] == [{"key": "b", "effect": "NoSchedule"}]
        # JSON patch (a list body)
        api.call("patch", api.core.patch_node, "n1", [{"op": "add", "path": "/spec/taints/-",
                                                       "value": {"key": "c", "effect": "NoExecute"}}])
        assert [t["key"] for t in fake_kube.get("nodes", "n1")["spec"]["taints"]] == ["b", "c"]
        # JSON merge patch
        api.call("patch", api.core.patch_node, "n1", {"spec": {"unschedulable": True}},
                 _content_type="application/merge-patch+json")
        assert fake_kube.get("nodes", "n1")["spec"]["unschedulable"] is True

    def test_status_only_changes_through_the_status_subresource(self, api, fake_kube):
        fake_kube.add_node("n1", gpus=8)
        api.call("patch", api.core.patch_node, "n1", {"status": {"allocatable": {"nvidia.com/gpu": "1"}}})
        assert fake_kube.get("nodes", "n1")["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        api.call("patch", api.core.patch_node_status, "n1", {"status": {"allocatable": {"nvidia.com/gpu": "1"}}})
        assert fake_kube.get("nodes", "n1")["status"]["allocatable"]["nvidia.com/gpu"] == "1"


class TestReads:
    def test_label_and_field_selectors_and_paging(self, api, fake_kube):
        for i in range(5):
            fake_kube.add_node(f"n{i}", labels={"zone": "a" if i < 3 else "b"})
        names = lambda items: [i["metadata"]["name"] for i in items]  # noqa: E731
        assert names(api.list_all("list", api.core.list_node, label_selector="zone in (b)", page_size=1)) == ["n3", "n4"]
        assert names(api.list_all("list", api.core.list_node, label_selector="zone!=a,kubernetes.io/hostname")) == ["n3", "n4"]
        assert names(api.list_all("list", api.core.list_node, field_selector="metadata.name=n2")) == ["n2"]
        page = api.call("list", api.core.list_node, limit=2)
        assert len(page["items"]) == 2 and page["metadata"]["continue"]
        fake_kube.add_pod("t", "p1", "n1")
        fake_kube.add_pod("t", "p2", "n2")
        assert names(api.list_all("list", api.core.list_pod_for_all_namespaces, field_selector="spec.nodeName=n2")) == ["p2"]
        with pytest.raises(GiveUp, match="field label not supported"):
            api.call("list", api.core.list_node, field_selector="spec.nodeName=n1")

    @pytest.mark.parametrize("selector, labels, expected", [
        ("a=1", {"a": "1"}, True), ("a==1", {"a": "2"}, False), ("a!=1", {}, True), ("a in (1,2)", {"a": "2"}, True),
        ("a notin (1,2)", {"a": "3"}, True), ("a", {}, False), ("!a", {}, True), ("a,b", {"a": "1", "b": ""}, True),
    ])
    def test_selector_operators(self, selector, labels, expected):
        assert label_matches(labels, parse_label_selector(selector)) is expected


class TestPods:
    def test_eviction_starts_graceful_deletion_and_grace_zero_removes(self, api, fake_kube):
        fake_kube.add_node("n1")
        fake_kube.add_pod("t", "p1", "n1")
        api.call("evict", api.core.create_namespaced_pod_eviction, "p1", "t",
                 {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "p1", "namespace": "t"}})
        assert fake_kube.get("pods", "p1", "t")["metadata"]["deletionTimestamp"]
        api.call("delete", api.core.delete_namespaced_pod, "p1", "t", grace_period_seconds=0)
        assert fake_kube.get("pods", "p1", "t") is None

    def test_deleting_a_namespace_removes_its_objects(self, api, fake_kube):
        fake_kube.add_node("n1")
        fake_kube.add_pod("t", "p1", "n1")
        api.call("delete", api.core.delete_namespace, "t")
        assert fake_kube.list("pods") == []


def test_node_manifest_registers_with_gpus_and_ready(fake_kube):
    fake_kube.put_object("nodes", node_manifest("n1", gpus=4))
    node = fake_kube.get("nodes", "n1")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["status"]["conditions"][0]["type"] == "Ready"
