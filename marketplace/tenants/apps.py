from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "marketplace.tenants"
    label = "tenants"
