from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from marketplace.inventory.models import Cluster
from tests.factories import RegionFactory
from tests.k8s_fake import FakeKube


def register(*args: str) -> str:
    out = StringIO()
    call_command("register_cluster", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def kubeconfig(tmp_path) -> str:
    return FakeKube().write_kubeconfig(tmp_path / "kubeconfig", context="prod")


class TestRegisterCluster:
    def test_registers_a_kubeconfig_cluster_and_is_idempotent(self, db, kubeconfig):
        RegionFactory(code="us-east")

        for _ in range(2):
            output = register("use-alpha", "--region", "us-east", "--kubeconfig", kubeconfig, "--context", "prod")

        cluster = Cluster.objects.get(name="use-alpha")
        assert (cluster.connection, cluster.kubeconfig_path, cluster.kube_context) == ("kubeconfig", kubeconfig, "prod")
        assert "Cluster use-alpha in us-east" in output

    def test_in_cluster_and_plan(self, db):
        RegionFactory(code="us-east")
        register("inside", "--region", "us-east", "--in-cluster")
        register("dry", "--region", "us-east", "--plan")
        assert dict(Cluster.objects.values_list("name", "connection")) == {"inside": "in_cluster", "dry": "plan"}

    @pytest.mark.parametrize("args, message", [
        (["--region", "mars", "--plan"], "No region 'mars'"),
        (["--region", "us-east", "--kubeconfig", "/nonexistent/kubeconfig"], "No kubeconfig file"),
        (["--region", "us-east", "--plan", "--context", "x"], "--context only applies"),
    ])
    def test_bad_input_is_a_clear_error(self, db, args, message):
        RegionFactory(code="us-east")
        with pytest.raises(CommandError, match=message):
            register("c1", *args)
        assert not Cluster.objects.exists()

    def test_unknown_context_and_non_kubeconfig_files_are_refused(self, db, kubeconfig, tmp_path):
        RegionFactory(code="us-east")
        with pytest.raises(CommandError, match="has no context 'staging'; it has: prod"):
            register("c1", "--region", "us-east", "--kubeconfig", kubeconfig, "--context", "staging")
        junk = tmp_path / "junk"
        junk.write_text("just: [text")
        with pytest.raises(CommandError, match="not valid YAML"):
            register("c1", "--region", "us-east", "--kubeconfig", str(junk))

    def test_a_name_registered_with_other_settings_is_reported(self, db, kubeconfig):
        RegionFactory(code="us-east")
        register("c1", "--region", "us-east", "--plan")
        with pytest.raises(CommandError, match="already registered with other settings"):
            register("c1", "--region", "us-east", "--kubeconfig", kubeconfig)
