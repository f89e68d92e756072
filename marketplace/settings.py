"""Settings. This is the only module that reads the environment.

DJANGO_ENV selects the defaults: ``production`` (the default: DEBUG off, secure cookies, every
secret required), ``development`` (the embedded run command) or ``test``.
"""

import re
from datetime import timedelta
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()

DJANGO_ENV = env.str("DJANGO_ENV", default="production")
if DJANGO_ENV not in {"production", "development", "test"}:
    raise ImproperlyConfigured(f"DJANGO_ENV must be production, development or test, not {DJANGO_ENV!r}")
IS_PRODUCTION = DJANGO_ENV == "production"

DEBUG = env.bool("DEBUG", default=DJANGO_ENV == "development")
if IS_PRODUCTION and DEBUG:
    # DEBUG pages show settings and SQL to anyone who makes a request fail.
    raise ImproperlyConfigured("DEBUG must be off in production (DJANGO_ENV=production); unset DEBUG.")

if IS_PRODUCTION:
    # Fail fast: a production process must never start with a guessable key.
    SECRET_KEY = env.str("SECRET_KEY", default="")
    if not SECRET_KEY:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. In production (DJANGO_ENV=production, the default) it must come from the "
            "environment; for a local run set DJANGO_ENV=development."
        )
else:
    SECRET_KEY = env.str("SECRET_KEY", default=f"insecure-{DJANGO_ENV}-only-key-do-not-use-in-production")

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[] if IS_PRODUCTION else ["127.0.0.1", "localhost", "testserver"])
# In a cluster the kubelet's probes and Prometheus's scrape address the pod by its IP (deploy/app.yaml
# passes it in): without it every probe was a 400 and no pod ever became ready.
if POD_IP := env.str("POD_IP", default=""):
    ALLOWED_HOSTS.append(f"[{POD_IP}]" if ":" in POD_IP else POD_IP)  # an IPv6 host is written in brackets
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

SECURE_COOKIES = env.bool("SECURE_COOKIES", default=IS_PRODUCTION)
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
BEHIND_TLS_PROXY = env.bool("BEHIND_TLS_PROXY", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if BEHIND_TLS_PROXY else None
# Behind the TLS proxy in production, plain HTTP is redirected and browsers are told to keep to HTTPS
# (the header is only ever sent on HTTPS responses). In-cluster probes and Prometheus scrapes come
# over plain HTTP from inside, so their paths are not redirected.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=IS_PRODUCTION and BEHIND_TLS_PROXY)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31_536_000 if IS_PRODUCTION else 0)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "marketplace.core",
    "marketplace.tenants",
    "marketplace.inventory",
    "marketplace.reservations",
    "marketplace.pools",
    "marketplace.api",
    "marketplace.web",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "marketplace.core.middleware.RejectNulInQueryMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "marketplace.urls"
WSGI_APPLICATION = "marketplace.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "marketplace.web.context_processors.current_tenant",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
# Embedded default: SQLite. Write transactions start IMMEDIATE so that they are serialised by
# SQLite's own lock (no lost updates, no "database is locked" upgrade deadlocks).
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'marketplace.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["TEST"] = {"NAME": env.str("SQLITE_TEST_NAME", default=str(VAR_DIR / "test.sqlite3"))}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # Django's cursors bind parameters on the client and never prepare. A threshold lets the few
    # statements that ask for it explicitly (core.db.fetch_prepared: the booking engine's hot path,
    # planned in longer than it runs) be prepared once per connection. Turn it off behind a pooler
    # in transaction mode that cannot keep prepared statements (PgBouncer before 1.21).
    if env.bool("DB_PREPARED_STATEMENTS", default=True):
        options = DATABASES["default"].setdefault("OPTIONS", {})
        options.setdefault("prepare_threshold", 1_000_000)
        # Those statements are written for one generic plan (cast parameters, literal states): plan
        # them once, not again on every run. Django's own queries are never prepared, so unaffected.
        options["options"] = f"{options.get('options', '')} -c plan_cache_mode=force_generic_plan".strip()
    # Under pytest-xdist every worker gets its own test database; the suffix keeps parallel
    # checkouts on one server apart too.
    if test_db := env.str("TEST_DATABASE_NAME", default=""):
        DATABASES["default"]["TEST"] = {"NAME": test_db}
DATABASE_IS_POSTGRES = DATABASES["default"]["ENGINE"].startswith("django.db.backends.postgresql")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
if DJANGO_ENV == "test":
    # Every user a test makes hashes a password; Django's default hasher (1.5 million PBKDF2
    # rounds) spends about 0.9 s of a CI core on each. Tests only: the other environments keep it.
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGIN_URL = "web:login"
LOGIN_REDIRECT_URL = "web:dashboard"
LOGOUT_REDIRECT_URL = "web:login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
# WhiteNoise warns about a missing root at every start; var/ is the process's own scratch space.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if IS_PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not IS_PRODUCTION

# --- REST API ---------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.tenants.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "marketplace.api.strict.ObjectJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "marketplace.api.pagination.DefaultPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "marketplace.api.errors.exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "GPU Marketplace API",
    "DESCRIPTION": "Book whole GPU nodes of the fleet, watch your node pools, pull usage and billing.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Several models have a "status"; name each choice set so the schema stays stable.
    "ENUM_NAME_OVERRIDES": {
        "NodeStatusEnum": "marketplace.inventory.models.Node.Status",
        "NodeHealthEnum": "marketplace.inventory.models.Node.Health",
        "ClusterStatusEnum": "marketplace.inventory.models.Cluster.Status",
        "ReservationStatusEnum": "marketplace.reservations.status.ReservationStatus",
        "BillingStatusEnum": "marketplace.tenants.models.Tenant.BillingStatus",
        "MembershipRoleEnum": "marketplace.tenants.models.Membership.Role",
    },
}

# --- Celery -----------------------------------------------------------------------------------
# Embedded default: kombu's filesystem transport, so worker and beat need no broker server.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = Path(env.str("CELERY_BROKER_DIR", default=str(VAR_DIR / "broker")))
    # kombu's filesystem transport does not create its folders; worker and beat fail without them.
    for _folder in ("queue", "processed"):
        (_broker_dir / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Its exchange tables (broadcasts to workers): by default a "control" folder in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True  # a worker killed mid-task leaves the message for another worker
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_TIMEZONE = "UTC"

# Per process by default; point CACHE_URL at Redis (redis://host:6379/1) to share across workers.
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}

# --- Marketplace policy -----------------------------------------------------------------------
MARKETPLACE = {
    # Kubernetes label/taint prefix for node pools.
    "LABEL_PREFIX": env.str("MARKETPLACE_LABEL_PREFIX", default="gpu.marketplace.io"),
    # Gap kept free after every allocation so a node is drained and cleaned before the next tenant.
    "CLEANING_GAP": timedelta(minutes=env.int("MARKETPLACE_CLEANING_GAP_MINUTES", default=30)),
    # Reservation boundaries are aligned to this granularity.
    "BOOKING_GRANULARITY": timedelta(minutes=env.int("MARKETPLACE_BOOKING_GRANULARITY_MINUTES", default=15)),
    "MIN_DURATION": timedelta(minutes=env.int("MARKETPLACE_MIN_DURATION_MINUTES", default=60)),
    "MAX_DURATION": timedelta(days=env.int("MARKETPLACE_MAX_DURATION_DAYS", default=90)),
    "MAX_LEAD_TIME": timedelta(days=env.int("MARKETPLACE_MAX_LEAD_TIME_DAYS", default=180)),
    "DEFAULT_CURRENCY": env.str("MARKETPLACE_DEFAULT_CURRENCY", default="USD").strip().upper(),
    # --- Scheduler (node pools) ---
    # A pool is provisioned this long before its window starts (the start event's due_at).
    "PROVISION_LEAD_TIME": timedelta(minutes=env.int("MARKETPLACE_PROVISION_LEAD_MINUTES", default=10)),
    # The tenant is told this long before the end that its pool will be drained.
    "END_NOTICE_LEAD_TIME": timedelta(minutes=env.int("MARKETPLACE_END_NOTICE_LEAD_MINUTES", default=30)),
    # Pod Security Standard enforced in tenant namespaces: baseline forbids privileged and host-path
    # pods (root on a node the next tenant gets); "privileged" for a fleet whose tenants are trusted.
    "POD_SECURITY_LEVEL": env.str("MARKETPLACE_POD_SECURITY_LEVEL", default="baseline"),
    # Beat: due events are swept this often; the full level-based reconcile runs this often.
    "EVENT_SWEEP_INTERVAL": timedelta(seconds=env.int("MARKETPLACE_EVENT_SWEEP_SECONDS", default=5)),
    "RECONCILE_INTERVAL": timedelta(seconds=env.int("MARKETPLACE_RECONCILE_SECONDS", default=180)),
    # A claimed event (or a pool lease) whose worker died is claimed again after this long.
    "CLAIM_TIMEOUT": timedelta(seconds=env.int("MARKETPLACE_CLAIM_TIMEOUT_SECONDS", default=300)),
    # Provisioning is retried with exponential backoff, at most this many times, then fails.
    "PROVISION_MAX_ATTEMPTS": env.int("MARKETPLACE_PROVISION_MAX_ATTEMPTS", default=5),
    "RETRY_BACKOFF": timedelta(seconds=env.int("MARKETPLACE_RETRY_BACKOFF_SECONDS", default=15)),
    "RETRY_BACKOFF_MAX": timedelta(seconds=env.int("MARKETPLACE_RETRY_BACKOFF_MAX_SECONDS", default=600)),
    # Tenant pods still running this long after the drain began are force-deleted.
    "DRAIN_GRACE_PERIOD": timedelta(seconds=env.int("MARKETPLACE_DRAIN_GRACE_SECONDS", default=300)),
    # --- Booking ---
    # A booking that loses a race for nodes retries on other free nodes this many times.
    "BOOKING_RETRIES": env.int("MARKETPLACE_BOOKING_RETRIES", default=4),
    # earliest=true searches at most this far ahead by default (and never beyond MAX_LEAD_TIME).
    "SEARCH_HORIZON": timedelta(days=env.int("MARKETPLACE_SEARCH_HORIZON_DAYS", default=14)),
    # The capacity calendar returns at most this many buckets.
    "CAPACITY_MAX_BUCKETS": env.int("MARKETPLACE_CAPACITY_MAX_BUCKETS", default=500),
    # A calendar is fleet-wide (no tenant's data) and costs about a second at fleet scale: it is kept
    # this long in the cache and shown with the time it was computed (0: computed every time).
    "CAPACITY_CACHE_TTL": timedelta(seconds=env.int("MARKETPLACE_CAPACITY_CACHE_SECONDS", default=60)),
}
if not re.fullmatch(r"[A-Z]{3}", MARKETPLACE["DEFAULT_CURRENCY"]):
    # It decides which offers rank first; prices carry ISO 4217 codes (the gpuprice_currency_iso rule).
    raise ImproperlyConfigured("MARKETPLACE_DEFAULT_CURRENCY must be a three-letter ISO 4217 code such as USD, not "
                               f"{MARKETPLACE['DEFAULT_CURRENCY']!r}")
if MARKETPLACE["POD_SECURITY_LEVEL"] not in {"privileged", "baseline", "restricted"}:
    raise ImproperlyConfigured("MARKETPLACE_POD_SECURITY_LEVEL must be privileged, baseline or restricted, not "
                               f"{MARKETPLACE['POD_SECURITY_LEVEL']!r}")

# /metrics is open on loopback; elsewhere it needs this bearer token or an allowed network.
METRICS_BEARER_TOKEN = env.str("METRICS_BEARER_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"])
# A Celery worker serves its own counters on this port (0: off). Its task processes share them
# through PROMETHEUS_MULTIPROC_DIR, which prometheus-client reads from the environment itself.
WORKER_METRICS_PORT = env.int("WORKER_METRICS_PORT", default=0)
WORKER_METRICS_ADDR = env.str("WORKER_METRICS_ADDR", default="127.0.0.1")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
