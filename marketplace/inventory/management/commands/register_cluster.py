"""Register a Kubernetes cluster the scheduler provisions node pools on.

    python manage.py register_cluster NAME --region CODE --kubeconfig PATH [--context CONTEXT]
    python manage.py register_cluster NAME --region CODE --in-cluster
    python manage.py register_cluster NAME --region CODE --plan

Safe to run again with the same settings. The kubeconfig is checked here (readable, YAML, the
context exists) so that a typo shows now and not at the first provisioning; whether its
credentials work shows in the scheduler's first reconcile.
"""

from pathlib import Path

import yaml
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from marketplace.core.services import Actor
from marketplace.inventory import services
from marketplace.inventory.models import Cluster, Region


def _contexts(path: Path) -> tuple[list[str], str]:
    """(context names, current context) of a kubeconfig file; CommandError when it is not one."""
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CommandError(f"Cannot read the kubeconfig {path}: {exc.strerror}.") from exc
    except yaml.YAMLError as exc:
        raise CommandError(f"The kubeconfig {path} is not valid YAML.") from exc
    if not isinstance(config, dict) or not isinstance(config.get("contexts"), list):
        raise CommandError(f"The file {path} is not a kubeconfig (it has no contexts).")
    names = [c.get("name") for c in config["contexts"] if isinstance(c, dict) and c.get("name")]
    return names, str(config.get("current-context") or "")


class Command(BaseCommand):
    help = "Register (or confirm) a Kubernetes cluster: by kubeconfig and context, in-cluster, or plan-only."

    def add_arguments(self, parser):
        parser.add_argument("name", help="cluster name (a slug, e.g. use-alpha)")
        parser.add_argument("--region", required=True, help="region code, e.g. us-east")
        mode = parser.add_mutually_exclusive_group(required=True)
        mode.add_argument("--kubeconfig", help="path of the kubeconfig file the scheduler reads")
        mode.add_argument("--in-cluster", action="store_true", help="use the scheduler pod's service account")
        mode.add_argument("--plan", action="store_true", help="no cluster: record what would be applied")
        parser.add_argument("--context", default="", help="kubeconfig context (default: its current context)")

    def handle(self, *args, **options):
        name = options["name"]
        region = Region.objects.filter(code=options["region"]).first()
        if region is None:
            known = ", ".join(Region.objects.values_list("code", flat=True)) or "none yet"
            raise CommandError(f"No region {options['region']!r}. Known regions: {known}.")
        context = options["context"]
        kubeconfig = ""
        if options["kubeconfig"]:
            path = Path(options["kubeconfig"]).expanduser().resolve()
            if not path.is_file():
                raise CommandError(f"No kubeconfig file at {path}.")
            contexts, current = _contexts(path)
            if context and context not in contexts:
                raise CommandError(f"The kubeconfig {path} has no context {context!r}; it has: {', '.join(contexts) or 'none'}.")
            if not context and not current:
                raise CommandError(f"The kubeconfig {path} has no current context; pass --context.")
            kubeconfig = str(path)
            connection = Cluster.Connection.KUBECONFIG
        elif options["in_cluster"]:
            connection = Cluster.Connection.IN_CLUSTER
        else:
            connection = Cluster.Connection.PLAN
        if context and connection != Cluster.Connection.KUBECONFIG:
            raise CommandError("--context only applies with --kubeconfig.")

        candidate = Cluster(name=name, region=region, connection=connection, kubeconfig_path=kubeconfig, kube_context=context)
        try:
            candidate.full_clean(validate_unique=False)
        except ValidationError as exc:
            messages = "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items())
            raise CommandError(f"Invalid cluster: {messages}") from exc

        cluster = services.cluster_ensure(actor=Actor("system:register_cluster"), name=name, region=region,
                                          connection=connection, kubeconfig_path=kubeconfig, kube_context=context)
        wanted = (region.pk, connection, kubeconfig, context)
        actual = (cluster.region_id, cluster.connection, cluster.kubeconfig_path, cluster.kube_context)
        if actual != wanted:
            raise CommandError(
                f"Cluster {name} is already registered with other settings (region {cluster.region}, "
                f"connection {cluster.connection}, kubeconfig {cluster.kubeconfig_path or '-'}, "
                f"context {cluster.kube_context or '-'}); change it in the Django admin."
            )
        where = {Cluster.Connection.KUBECONFIG: f"kubeconfig {kubeconfig} (context {context or 'current'})",
                 Cluster.Connection.IN_CLUSTER: "the in-cluster service account",
                 Cluster.Connection.PLAN: "plan only (no cluster)"}[connection]
        self.stdout.write(self.style.SUCCESS(f"Cluster {name} in {region.code}: {where}."))
