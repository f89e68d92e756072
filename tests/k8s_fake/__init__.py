"""A stateful fake Kubernetes API server for tests and the scheduler benchmark (see ``server.py``)."""

from tests.k8s_fake.server import FakeKube, node_manifest, pod_manifest

__all__ = ["FakeKube", "node_manifest", "pod_manifest"]
