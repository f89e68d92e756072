"""Production defaults: refuse to start without SECRET_KEY; with it, DEBUG off and cookies secure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PRINT_SETTINGS = (
    "import json; from django.conf import settings; "
    "print(json.dumps({'DEBUG': settings.DEBUG, 'SESSION_COOKIE_SECURE': settings.SESSION_COOKIE_SECURE, "
    "'CSRF_COOKIE_SECURE': settings.CSRF_COOKIE_SECURE, 'ALLOWED_HOSTS': settings.ALLOWED_HOSTS, "
    "'PASSWORD_HASHER': settings.PASSWORD_HASHERS[0]}))"
)


def load_settings(**overrides: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in {"SECRET_KEY", "DEBUG", "SECURE_COOKIES"}}
    environment.update({"DJANGO_SETTINGS_MODULE": "marketplace.settings", **overrides})
    return subprocess.run(
        [sys.executable, "-c", PRINT_SETTINGS], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
    )


def test_production_without_secret_key_refuses_to_start():
    # given production (the default DJANGO_ENV) and no SECRET_KEY
    # when the settings are loaded
    result = load_settings(DJANGO_ENV="production")
    # then the process fails with a message that names the missing variable
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY is not set" in result.stderr


def test_production_with_secret_key_has_safe_defaults():
    # given production with a secret key
    result = load_settings(DJANGO_ENV="production", SECRET_KEY="a-long-random-production-secret")
    # then DEBUG is off, cookies are secure, no host is allowed until configured, and passwords are
    # hashed by Django's strong default (the tests' fast hasher stays in the tests)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {"DEBUG": False, "SESSION_COOKIE_SECURE": True, "CSRF_COOKIE_SECURE": True, "ALLOWED_HOSTS": [],
                      "PASSWORD_HASHER": "django.contrib.auth.hashers.PBKDF2PasswordHasher"}


def test_production_refuses_debug_and_defaults_to_https_behind_the_tls_proxy():
    # given production with DEBUG switched on, then production behind the TLS proxy
    debug = load_settings(DJANGO_ENV="production", SECRET_KEY="a-long-random-production-secret", DEBUG="true")
    # then the first refuses to start, naming DEBUG
    assert debug.returncode != 0 and "DEBUG must be off in production" in debug.stderr
    probe = subprocess.run(
        [sys.executable, "-c", "import json; from django.conf import settings; print(json.dumps("
         "[settings.SECURE_SSL_REDIRECT, settings.SECURE_HSTS_SECONDS, settings.SECURE_REDIRECT_EXEMPT]))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "SECURE_SSL_REDIRECT",
                                                                  "SECURE_HSTS_SECONDS"}},
             "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DJANGO_ENV": "production",
             "SECRET_KEY": "a-long-random-production-secret", "BEHIND_TLS_PROXY": "true"})
    # and the second redirects plain HTTP (not the probes and the scrape) and sends HSTS for a year
    assert probe.returncode == 0, probe.stderr
    redirect, hsts, exempt = json.loads(probe.stdout.strip().splitlines()[-1])
    assert redirect is True and hsts == 31_536_000 and {"^healthz$", "^readyz$", "^metrics$"} <= set(exempt)


def test_the_marketplace_currency_is_an_iso_code():
    # a lower-case code is read as the code; anything else refuses to start
    probe = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; print(settings.MARKETPLACE['DEFAULT_CURRENCY'])"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DJANGO_ENV": "test",
             "MARKETPLACE_DEFAULT_CURRENCY": " eur "})
    assert probe.returncode == 0 and probe.stdout.strip() == "EUR", probe.stderr
    result = load_settings(DJANGO_ENV="test", MARKETPLACE_DEFAULT_CURRENCY="dollars")
    assert result.returncode != 0 and "MARKETPLACE_DEFAULT_CURRENCY must be a three-letter" in result.stderr


@pytest.mark.parametrize(("pod_ip", "host"), [("10.1.2.3", "10.1.2.3:8000"), ("fd00::5", "[fd00::5]:8000")])
def test_the_pods_own_ip_is_an_allowed_host_for_probes_and_scrapes(pod_ip, host):
    # given production as deploy/app.yaml runs it: one public host, and the pod's IP passed in
    probe = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.test import Client; c = Client(); "
         f"print(c.get('/healthz', HTTP_HOST='{host}').status_code, "
         "c.get('/healthz', HTTP_HOST='elsewhere.example').status_code)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in {"SECRET_KEY", "DEBUG", "ALLOWED_HOSTS"}},
             "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DJANGO_ENV": "production",
             "SECRET_KEY": "a-long-random-production-secret", "ALLOWED_HOSTS": "gpu-marketplace.example.com",
             "POD_IP": pod_ip, "BEHIND_TLS_PROXY": "true"})
    # then the kubelet's probe by IP is answered, and any other host is still refused
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == "200 400"


def test_unknown_environment_name_is_refused():
    result = load_settings(DJANGO_ENV="staging")
    assert result.returncode != 0
    assert "DJANGO_ENV must be production, development or test" in result.stderr


def test_embedded_default_is_sqlite_immediate_and_a_serverless_broker():
    # given development with no DATABASE_URL and no CELERY_BROKER_URL
    probe = subprocess.run(
        [sys.executable, "-c", "from django.conf import settings; print(settings.DATABASES['default']['OPTIONS']"
         "['transaction_mode'], settings.CELERY_BROKER_URL)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in {"CELERY_BROKER_URL", "DATABASE_URL"}},
             "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DJANGO_ENV": "development"},
    )
    # then write transactions start IMMEDIATE and the broker needs no server
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["IMMEDIATE", "filesystem://"]


def test_the_embedded_broker_keeps_every_file_in_its_folder(tmp_path):
    # given the embedded broker in a folder of its own, and a process started somewhere else
    broker = tmp_path / "broker"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # when a broadcast to the workers is sent (it binds the control exchange)
    probe = subprocess.run(
        [sys.executable, "-c", "from marketplace.celery import app; app.control.ping(timeout=0.1)"],
        cwd=elsewhere, capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k not in {"CELERY_BROKER_URL", "DATABASE_URL"}},
             "DJANGO_SETTINGS_MODULE": "marketplace.settings", "DJANGO_ENV": "development", "PYTHONPATH": str(ROOT),
             "CELERY_BROKER_DIR": str(broker)},
    )
    # then its exchange table is in the broker's folder, not in the working directory
    assert probe.returncode == 0, probe.stderr
    assert list(elsewhere.iterdir()) == []
    assert [table.name for table in (broker / "control").iterdir()] == ["reply.celery.pidbox.exchange"]

