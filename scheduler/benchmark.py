"""Provision and release a node pool of --nodes nodes and report wall time and API requests per node.

``python manage.py benchmark scheduler [--nodes 1024] [--kubeconfig PATH [--context C]] [--workers 8]``

Without ``--kubeconfig`` it runs against the stateful fake Kubernetes API server of the test
suite (``tests/k8s_fake``), started in this process on 127.0.0.1 — so that mode needs the
checkout's ``tests/`` directory. With ``--kubeconfig`` it creates ``--nodes`` Node objects named
``bench-<id>-<n>`` on that cluster (no kubelet needed), runs the same steps, and deletes them.

Figures: the wall time and the requests the driver sent for provisioning (tenant objects + node
labels/taints), the readiness check and the release (cordon, drain, unlabel, tenant removal);
and the floor: the time of the same number of bare PATCH requests as provisioning sent, through
the same client in the same run, once one after another and once on the driver's thread pool.
Targets: at most 2 requests per node for provisioning, and at most 3x the floor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from scheduler.driver import ClusterError, PoolSpec, TenantSpec, namespace_for
from scheduler.kube import KubeApi, RetryPolicy
from scheduler.kube_driver import KubernetesDriver

MAX_REQUESTS_PER_NODE = 2
MAX_FLOOR_RATIO = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1024, help="pool size (default 1024)")
    parser.add_argument("--kubeconfig", default="", help="run against this cluster instead of the in-process fake API server")
    parser.add_argument("--context", default="", help="kubeconfig context (default: the current one)")
    parser.add_argument("--workers", type=int, default=8, help="driver threads for per-node requests (default 8)")
    parser.add_argument("--gpus-per-node", type=int, default=8)


def _node(name: str, gpus: int) -> dict:
    resources = {"cpu": "96", "memory": "1056Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {"capacity": resources, "allocatable": resources, "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "",
             "lastHeartbeatTime": now, "lastTransitionTime": now}]},
    }


def _timed(driver: KubernetesDriver, step) -> tuple[float, int, Any]:
    before = driver.api.requests
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, driver.api.requests - before, result


def run(options: dict, stdout) -> dict:
    nodes_wanted = options["nodes"]
    if nodes_wanted < 1 or nodes_wanted > 100_000:
        raise CommandError("--nodes must be between 1 and 100000.")
    if options["workers"] < 1:
        raise CommandError("--workers must be at least 1.")
    run_id = uuid.uuid4().hex[:6]
    names = [f"bench-{run_id}-{i:05d}" for i in range(nodes_wanted)]
    fake = None
    with tempfile.TemporaryDirectory() as scratch:
        if options["kubeconfig"]:
            kubeconfig, target = options["kubeconfig"], f"kubeconfig {options['kubeconfig']}"
            if not Path(kubeconfig).is_file():
                raise CommandError(f"No kubeconfig file at {kubeconfig}.")
        else:
            try:
                from tests.k8s_fake import FakeKube  # the test suite's fake API server
            except ImportError as exc:
                raise CommandError("The fake API server lives in the checkout's tests/ directory, which is not "
                                   "available here; pass --kubeconfig to benchmark a real cluster.") from exc
            fake = FakeKube().start()
            kubeconfig, target = fake.write_kubeconfig(Path(scratch) / "kubeconfig"), "fake API server (in-process)"
        policy = RetryPolicy(attempts=4, backoff=0.2, max_backoff=2.0, connect_timeout=5.0, read_timeout=60.0)
        try:
            driver = KubernetesDriver.from_kubeconfig(kubeconfig, options["context"], cluster="benchmark",
                                                      policy=policy, workers=options["workers"])
            arrange = KubeApi.from_kubeconfig("benchmark-setup", kubeconfig, options["context"], policy)
        except ClusterError as exc:
            raise CommandError(str(exc)) from exc
        try:
            stdout.write(f"Creating {nodes_wanted} nodes on the {target}...\n")
            _create_nodes(arrange, fake, names, options["gpus_per_node"], options["workers"])
            return _measure(driver, arrange, names, run_id, target, options)
        except ClusterError as exc:
            raise CommandError(f"The benchmark failed: {exc}") from exc
        finally:
            _delete_nodes(arrange, fake, names, options["workers"])
            driver.api.close()
            arrange.close()
            if fake is not None:
                fake.stop()


def _create_nodes(api: KubeApi, fake, names: list[str], gpus: int, workers: int) -> None:
    if fake is not None:
        for name in names:  # straight into the store: setting up is not what is measured
            fake.put_object("nodes", _node(name, gpus))
        return

    def create(name: str) -> None:
        manifest = _node(name, gpus)
        status = manifest.pop("status")
        api.call("create", api.core.create_node, manifest)
        api.call("patch", api.core.patch_node_status, name, {"status": status})

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, names))


def _delete_nodes(api: KubeApi, fake, names: list[str], workers: int) -> None:
    if fake is not None:
        return

    def delete(name: str) -> None:
        try:
            api.call("delete", api.core.delete_node, name)
        except ClusterError:
            pass

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(delete, names))


def _measure(driver: KubernetesDriver, api: KubeApi, names: list[str], run_id: str, target: str, options: dict) -> dict:
    prefix = settings.MARKETPLACE["LABEL_PREFIX"]
    slug = f"bench-{run_id}"
    count = len(names)
    tenant = TenantSpec(cluster="benchmark", tenant=slug, group=f"tenant:{slug}", namespace=namespace_for(slug),
                        gpus=count * options["gpus_per_node"], label_prefix=prefix)
    pool = PoolSpec(cluster="benchmark", pool=f"bench-{run_id}", reservation_id="0", tenant=slug,
                    namespace=tenant.namespace, nodes=tuple(names), gpus_per_node=options["gpus_per_node"],
                    label_prefix=prefix)

    def provision() -> None:
        driver.ensure_tenant(tenant)
        driver.apply_pool(pool)

    def release() -> None:
        driver.drain_pool(pool, force=False)
        driver.drain_pool(pool, force=True)
        driver.unlabel_pool(pool)
        driver.ensure_tenant(TenantSpec(**{**tenant.__dict__, "gpus": 0}))

    provision_s, provision_n, _ = _timed(driver, provision)
    reapply_s, reapply_n, _ = _timed(driver, provision)
    check_s, check_n, readiness = _timed(driver, lambda: driver.check_pool(pool))
    release_s, release_n, _ = _timed(driver, release)

    # The floor: as many bare PATCHes as provisioning sent, through the same adapter.
    bench_key = f"{prefix}/benchmark"
    targets = [names[i % count] for i in range(provision_n)]

    def bare(index: int) -> None:
        api.call("patch", api.core.patch_node, targets[index], {"metadata": {"labels": {bench_key: str(index)}}})

    started = time.perf_counter()
    for index in range(len(targets)):
        bare(index)
    floor_serial = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(options["workers"]) as executor:
        list(executor.map(bare, range(len(targets))))
    floor_parallel = time.perf_counter() - started
    floor = min(floor_serial, floor_parallel)

    per_node = lambda n: round(n / count, 3)  # noqa: E731
    return {
        "target": target,
        "nodes": count,
        "workers": options["workers"],
        "provision": {"seconds": round(provision_s, 3), "requests": provision_n, "requests_per_node": per_node(provision_n)},
        "reapply_unchanged": {"seconds": round(reapply_s, 3), "requests": reapply_n, "requests_per_node": per_node(reapply_n)},
        "readiness_check": {"seconds": round(check_s, 3), "requests": check_n, "requests_per_node": per_node(check_n),
                            "passed": readiness.passed},
        "release": {"seconds": round(release_s, 3), "requests": release_n, "requests_per_node": per_node(release_n)},
        "floor": {"bare_patch_requests": len(targets), "seconds_serial": round(floor_serial, 3),
                  "seconds_parallel": round(floor_parallel, 3)},
        "provision_vs_floor": round(provision_s / floor, 2) if floor else None,
        "targets_met": {
            f"provision_requests_per_node<={MAX_REQUESTS_PER_NODE}": provision_n / count <= MAX_REQUESTS_PER_NODE,
            f"provision_time<={MAX_FLOOR_RATIO}x_floor": bool(floor) and provision_s <= MAX_FLOOR_RATIO * floor,
        },
    }
