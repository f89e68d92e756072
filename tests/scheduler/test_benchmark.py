"""The scheduler benchmark runs end to end (its figures are read from the command, not asserted)."""

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError


def test_benchmark_scheduler_prints_its_figures_as_json(db):
    out = StringIO()
    call_command("benchmark", "scheduler", "--nodes", "6", "--workers", "2", stdout=out)

    figures = json.loads(out.getvalue()[out.getvalue().index("{"):])

    assert figures["nodes"] == 6 and figures["readiness_check"]["passed"] is True
    assert figures["provision"]["requests"] > 0 and figures["floor"]["bare_patch_requests"] == figures["provision"]["requests"]


def test_bad_arguments_are_clear_errors(db, tmp_path):
    with pytest.raises(CommandError, match="--nodes must be between"):
        call_command("benchmark", "scheduler", "--nodes", "0", stdout=StringIO())
    with pytest.raises(CommandError, match="No kubeconfig file"):
        call_command("benchmark", "scheduler", "--kubeconfig", str(tmp_path / "missing"), stdout=StringIO())


def test_benchmark_against_a_cluster_by_kubeconfig_creates_and_removes_its_nodes(db, fake_kube, tmp_path):
    # The fake stands in for a real cluster here: the benchmark creates its nodes through the API.
    kubeconfig = fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
    out = StringIO()

    call_command("benchmark", "scheduler", "--nodes", "3", "--kubeconfig", kubeconfig, stdout=out)

    figures = json.loads(out.getvalue()[out.getvalue().index("{"):])
    assert figures["target"] == f"kubeconfig {kubeconfig}" and figures["readiness_check"]["passed"] is True
    assert fake_kube.list("nodes") == []
    assert fake_kube.count("POST", "/api/v1/nodes") == 3 and fake_kube.count("DELETE", "/api/v1/nodes/") == 3
