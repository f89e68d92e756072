"""Which driver serves a cluster: plan-only, or Kubernetes through its kubeconfig / in-cluster account."""

from marketplace.inventory.models import Cluster
from scheduler.driver import ClusterDriver
from scheduler.plan_driver import PlanDriver


def driver_for(cluster: Cluster) -> ClusterDriver:
    if cluster.connection == Cluster.Connection.PLAN:
        return PlanDriver(cluster.name)
    from scheduler.kube_driver import KubernetesDriver  # imports the kubernetes client only when needed

    return KubernetesDriver.for_cluster(cluster)
