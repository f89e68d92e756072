"""End to end with real processes: two Celery workers, each with an embedded beat (so two beats
sweep at once), a Redis broker, the test database, and the fake Kubernetes API server. A
reservation goes from confirmed to completed by itself; the node labels and taints appear on the
server and are removed again, and every transition happened exactly once.

Needs PostgreSQL (the workers share the test database) and Redis at ``TEST_REDIS_URL``
(default redis://127.0.0.1:6379/5, a database number of its own: the test empties it).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.inventory.models import Cluster
from marketplace.pools.models import PoolNotice
from marketplace.reservations.models import Reservation, ReservationEvent
from tests.factories import ClusterFactory
from tests.scheduler.helpers import book, fake_server, node_marks, server_nodes  # noqa: F401 - fixtures

S = Reservation.Status
REPO = Path(__file__).resolve().parents[2]
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/5")
PREFIX = "gpu.marketplace.io"


def redis_or_skip():
    import redis

    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"Redis is not reachable at {TEST_REDIS_URL} ({exc}); CI runs this test with Redis")
    return client


def database_url() -> str:
    """The test database, for the worker processes."""
    s = connection.settings_dict
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker(index: int, tmp_path: Path, metrics_port: int = 0) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        "DJANGO_ENV": "test",
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": TEST_REDIS_URL,
        "MARKETPLACE_EVENT_SWEEP_SECONDS": "1",
        "MARKETPLACE_RECONCILE_SECONDS": "2",
        "MARKETPLACE_RETRY_BACKOFF_SECONDS": "1",
        "MARKETPLACE_DRAIN_GRACE_SECONDS": "2",
        "PYTHONDONTWRITEBYTECODE": "1",
        # the worker's task processes share their counters through this folder; the main process serves them
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"metrics-{index}"),
        "WORKER_METRICS_PORT": str(metrics_port),
    }
    log = tmp_path / f"worker-{index}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "marketplace", "worker", "--beat",
         "--schedule", str(tmp_path / f"beat-{index}"), "--hostname", f"e2e-{index}@%h", "--concurrency", "2",
         "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    return process, log


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def wait_for(predicate, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-40:]) for log in logs)
    pytest.fail(f"timed out after {timeout}s\n{tails}")


@pytest.mark.postgres_only
@pytest.mark.django_db(transaction=True)
def test_real_workers_and_beats_take_a_reservation_from_confirmed_to_completed(fake_server, tmp_path):
    redis_or_skip().flushdb()
    # given a registered cluster (the fake API server), two nodes, and a confirmed reservation
    # whose start is due now and whose window ends 20 seconds from now
    cluster = ClusterFactory(name="e2e-fake", connection=Cluster.Connection.KUBECONFIG,
                             kubeconfig_path=fake_server.write_kubeconfig(tmp_path / "kubeconfig"))
    nodes, _ = server_nodes(fake_server, cluster)
    now = timezone.now()
    reservation = book(nodes=nodes, starts_at=now + timedelta(seconds=2), duration=timedelta(seconds=18), events=False)
    for kind, due in (("start", now), ("end_notice", now + timedelta(seconds=8)), ("end", reservation.ends_at)):
        ReservationEvent.objects.create(reservation=reservation, kind=kind, due_at=due)
    namespace = f"tenant-{reservation.tenant.slug}"

    # when two workers with a beat each run
    metrics_ports = {1: free_port(), 2: free_port()}
    workers = [start_worker(index, tmp_path, metrics_ports[index]) for index in (1, 2)]
    logs = [log for _, log in workers]
    try:
        def status():
            return Reservation.objects.values_list("status", flat=True).get(pk=reservation.pk)

        # then the pool becomes active, with the labels and taint on the server's nodes
        wait_for(lambda: status() == S.ACTIVE, 60, logs)
        for node in nodes:
            marks = node_marks(fake_server, node.name)
            assert marks["labels"][f"{PREFIX}/pool"] == reservation.pool_name
            assert marks["taints"] == [{"key": f"{PREFIX}/tenant", "value": reservation.tenant.slug,
                                        "effect": "NoSchedule"}]
        assert fake_server.get("resourcequotas", "gpu-quota", namespace) is not None
        # and the notice is posted, and at the end the pool is released
        wait_for(lambda: status() == S.COMPLETED, 60, logs)
        # and the workers' own metrics endpoints show the Kubernetes requests their task processes made
        scraped = "".join(scrape(port) for port in metrics_ports.values())
    finally:
        for process, _ in workers:
            stop(process)

    kube_requests = sum(float(line.rsplit(" ", 1)[1]) for line in scraped.splitlines()
                        if line.startswith('marketplace_kubernetes_requests_total{cluster="e2e-fake"'))
    assert kube_requests > 0, scraped
    assert "marketplace_scheduler_tasks_total{" in scraped

    # then the labels, taints and namespace are gone from the server
    for node in nodes:
        assert node_marks(fake_server, node.name) == {"labels": {}, "taints": [], "unschedulable": False}
    assert fake_server.get("namespaces", namespace) is None
    # (the notice Event was posted into the namespace before it went)
    assert PoolNotice.objects.get(reservation=reservation).posted_to_cluster_at is not None
    # and both beats really swept
    for log in logs:
        assert "Sending due task sweep-due-events" in log.read_text()
    # and each transition happened exactly once, although two beats swept
    actions = Counter(AuditLog.objects.filter(object_id=str(reservation.pk)).values_list("action", flat=True))
    for action in ("reservation.provisioning", "reservation.ready", "reservation.active", "reservation.end_notice",
                   "reservation.releasing", "reservation.released", "reservation.completed"):
        assert actions[action] == 1, (action, actions)
    assert set(ReservationEvent.objects.filter(reservation=reservation).values_list("status", flat=True)) == {"done"}
    reservation.refresh_from_db()
    assert reservation.end_notice_at is not None and reservation.ready_at is not None
