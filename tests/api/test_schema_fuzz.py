"""Every operation of the OpenAPI schema, fed generated input: never a server error.

Schemathesis reads the schema the API serves and calls the real WSGI application with requests
made from it (valid ones and deliberately broken ones), on a small fleet, as a tenant owner and
as ops. The examples are derandomised so that CI is repeatable; for a deeper hunt, run
``API_FUZZ_EXAMPLES=300 API_FUZZ_RANDOM=1 scripts/test tests/api/test_schema_fuzz.py``.
"""

import json
import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error

from tests.conftest import issue_token
from tests.factories import (ClusterFactory, GpuModelFactory, GpuPriceFactory, MembershipFactory, NodeFactory,
                             RegionFactory)

EXAMPLES = int(os.environ.get("API_FUZZ_EXAMPLES", "15"))


def served_schema() -> schemathesis.schemas.BaseSchema:
    """The schema /api/schema/ serves (generated without a request: no database at collection), calling
    the WSGI application in-process."""
    from marketplace.wsgi import application

    generated = SchemaGenerator().get_schema(request=None, public=True)
    schema = schemathesis.openapi.from_dict(json.loads(OpenApiJsonRenderer().render(generated)))
    schema.app = application
    return schema


@pytest.fixture(autouse=True)
def requests_keep_the_test_connection():
    # As Django's test client does: a request's end must not close the test's connection, whose
    # transaction holds the fleet and the tokens.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def small_fleet(db):
    """A priced H100 cluster of four nodes in two topology domains."""
    region = RegionFactory(code="us-east")
    model = GpuModelFactory(name="H100-SXM-80GB", gpus_per_node=8)
    GpuPriceFactory(gpu_model=model, region=region)
    cluster = ClusterFactory(name="east-1", region=region)
    for index in range(4):
        NodeFactory(cluster=cluster, gpu_model=model, topology_domain=f"ib-{index % 2}")


@pytest.fixture
def owner_token(small_fleet, tenant) -> str:
    return issue_token(MembershipFactory(tenant=tenant, role="owner").user, tenant)


@pytest.fixture
def ops_token(small_fleet, staff_user, tenant) -> str:
    return issue_token(staff_user, tenant)


schema = served_schema().exclude(
    # Revoking the token the fuzzer calls with would leave every later example a 401.
    path_regex=r"/revoke/$")


# Generated examples only: schemathesis' explicit boundary cases come to some 130 requests per
# operation, more than the suite's time allows for all of them.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("API_FUZZ_RANDOM"),
                phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck), database=None)


@schema.parametrize()
@FUZZ
def test_a_tenant_owner_s_generated_requests_are_never_a_server_error(case, owner_token):
    case.call_and_validate(headers={"Authorization": f"Bearer {owner_token}"}, checks=[not_a_server_error])


@schema.parametrize()
@FUZZ
def test_ops_generated_requests_are_never_a_server_error(case, ops_token):
    case.call_and_validate(headers={"Authorization": f"Bearer {ops_token}"}, checks=[not_a_server_error])
