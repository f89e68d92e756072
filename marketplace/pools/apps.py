from django.apps import AppConfig


class PoolsConfig(AppConfig):
    name = "marketplace.pools"
    label = "pools"
    verbose_name = "Node pools (scheduler state)"
