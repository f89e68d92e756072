import pytest

from tests.factories import NodeFactory


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_reports_database_and_broker(client):
    response = client.get("/readyz")
    body = response.json()
    assert body["checks"]["database"] == "ok"
    assert "broker" in body["checks"]


@pytest.mark.django_db
def test_metrics_on_loopback_show_fleet_gauges(client):
    NodeFactory(gpu_count=8)
    NodeFactory(gpu_count=8, status="maintenance")
    response = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    text = response.content.decode()
    assert response.status_code == 200
    assert 'marketplace_fleet_gpus{cluster="' in text
    assert 'state="idle"} 8.0' in text and 'state="maintenance"} 8.0' in text


@pytest.mark.django_db
def test_metrics_elsewhere_need_the_bearer_token(client, settings):
    settings.METRICS_BEARER_TOKEN = "s3cret"
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 403
    ok = client.get("/metrics", REMOTE_ADDR="203.0.113.9", HTTP_AUTHORIZATION="Bearer s3cret")
    assert ok.status_code == 200


@pytest.mark.django_db
def test_readyz_is_503_when_the_broker_is_unreachable(client, settings):
    # given a broker URL nothing listens on
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    # when the readiness probe runs
    response = client.get("/readyz")
    # then it reports the broker, not the database, as the problem
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("error")


@pytest.mark.django_db
def test_readyz_is_200_on_the_embedded_broker(client, settings):
    settings.CELERY_BROKER_URL = "filesystem://"
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}
