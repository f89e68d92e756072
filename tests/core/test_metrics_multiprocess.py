"""Counters incremented in several processes (gunicorn workers, prefork Celery children) are summed."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: prometheus-client picks multiprocess mode at import time.
SCRIPT = """
import multiprocessing, os
from prometheus_client import generate_latest
from marketplace import metrics

def work(times):
    for _ in range(times):
        metrics.KUBERNETES_REQUESTS.labels(cluster="c1", verb="patch", outcome="ok").inc()

metrics.multiprocess_dir_reset()
children = [multiprocessing.get_context("fork").Process(target=work, args=(n,)) for n in (2, 3)]
for child in children:
    child.start()
for child in children:
    child.join()
print(generate_latest(metrics.worker_registry()).decode())
"""


def run_script(tmp_path) -> str:
    stale = tmp_path / "metrics"
    stale.mkdir()
    # a previous run's file must not be summed in
    (stale / "counter_999.db").write_bytes(b"garbage from a previous run")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(stale), "DJANGO_SETTINGS_MODULE": "marketplace.settings",
           "DJANGO_ENV": "test", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_worker_registry_sums_counters_of_all_task_processes(tmp_path):
    # given two task processes that made 2 and 3 Kubernetes requests
    exposition = run_script(tmp_path)
    # then the worker's endpoint reports 5, and not the previous run's counts
    line = next(row for row in exposition.splitlines()
                if row.startswith('marketplace_kubernetes_requests_total{cluster="c1"'))
    assert float(line.rsplit(" ", 1)[1]) == 5.0
