"""The Kubernetes adapter: the only module of the project that imports ``kubernetes``.

One ``KubeApi`` per registered cluster (kubeconfig path + context, or the in-cluster service
account). Every request goes through ``KubeApi.call``, which

- sets a (connect, read) timeout, so a hung API server cannot block a worker;
- retries 429, 5xx, timeouts and connection errors with bounded exponential backoff (honouring a
  short ``Retry-After``), then raises ``RetryLater``;
- maps every other failure to ``GiveUp`` (403, 422, 400, ...) or to the typed subclasses
  ``NotFound`` / ``AlreadyExists`` / ``Conflict`` that callers handle as part of level-based
  reconciling (404 on delete = done, 409 on create = exists);
- counts the request in ``marketplace_kubernetes_requests_total`` (cluster, verb, outcome) and in
  the instance's own ``requests`` counter (the benchmark reads that).

Responses are returned as plain JSON dicts (``_preload_content=False``): deserialising thousands of
Node objects into the client's model classes is slow, and dicts keep the driver free of
``kubernetes`` types.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from marketplace.metrics import KUBERNETES_REQUESTS
from scheduler.driver import GiveUp, RetryLater

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# A dict body is sent as a strategic merge patch, a list body as a JSON patch: that is how the
# client picks the content type (``ApiClient.select_header_content_type`` + ``RESTClientObject``).

RETRYABLE_STATUSES = {429, 500, 502, 503, 504}


class NotFound(GiveUp):
    """404. Callers treat it as "already gone" (delete) or "node gone" (patch)."""


class AlreadyExists(GiveUp):
    """409 AlreadyExists on create: the deterministic name exists, which is success for us."""


class Conflict(RetryLater):
    """409 Conflict: the object changed since we read it (stale resourceVersion)."""


class TooManyRequests(RetryLater):
    """429 after the retries (or at once with ``_no_retry={429}``: an eviction a disruption budget
    refuses is answered with 429, and waiting inside one call will not change that)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries of one request, including the first
    backoff: float = 0.2  # seconds before the 2nd try; doubles each time, with jitter
    max_backoff: float = 2.0  # cap on one wait, including a server's Retry-After
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


def _status_body(exc: ApiException) -> dict:
    try:
        body = json.loads(exc.body or b"{}")
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def _describe(exc: ApiException) -> tuple[str, str]:
    """(reason, message) of a Kubernetes ``Status`` body, falling back to the HTTP reason. A cause's
    reason stands in for a 403 caused by a namespace being deleted (``NamespaceTerminating``)."""
    body = _status_body(exc)
    reason = body.get("reason") or str(exc.reason or "")
    causes = (body.get("details") or {}).get("causes") or []
    if any(isinstance(c, dict) and c.get("reason") == "NamespaceTerminating" for c in causes):
        reason = "NamespaceTerminating"
    return reason, body.get("message") or str(exc.reason or exc.status)


class KubeApi:
    """A client for one cluster. Thread-safe: urllib3's pool is shared by the calling threads."""

    def __init__(self, cluster: str, api_client: k8s.ApiClient, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cluster = cluster
        self.api_client = api_client
        self.policy = policy or RetryPolicy()
        self.core = k8s.CoreV1Api(api_client)
        self.networking = k8s.NetworkingV1Api(api_client)
        self.rbac = k8s.RbacAuthorizationV1Api(api_client)
        self._sleep = sleep
        self._lock = threading.Lock()
        self.requests = 0  # HTTP requests sent, retries included

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_kubeconfig(cls, cluster: str, path: str, context: str = "", policy: RetryPolicy | None = None) -> KubeApi:
        configuration = k8s.Configuration()
        try:
            k8s_config.load_kube_config(config_file=path, context=context or None,
                                        client_configuration=configuration, persist_config=False)
        except (ConfigException, OSError, ValueError, TypeError) as exc:
            raise GiveUp(f"cluster {cluster}: cannot load kubeconfig {path!r} (context {context or 'current'!r}): {exc}") from exc
        return cls(cluster, _api_client(configuration), policy)

    @classmethod
    def from_url(cls, cluster: str, url: str, *, token: str = "", ca_cert: str = "", verify_ssl: bool = True,
                 policy: RetryPolicy | None = None) -> KubeApi:
        """A client for an API server URL with an optional bearer token (tests, ad-hoc tools)."""
        if not url.startswith(("http://", "https://")):
            raise GiveUp(f"cluster {cluster}: {url!r} is not an http(s) URL")
        configuration = k8s.Configuration(host=url.rstrip("/"))
        if token:
            configuration.api_key = {"authorization": token}
            configuration.api_key_prefix = {"authorization": "Bearer"}
        configuration.verify_ssl = verify_ssl
        if ca_cert:
            configuration.ssl_ca_cert = ca_cert
        return cls(cluster, _api_client(configuration), policy)

    @classmethod
    def in_cluster(cls, cluster: str, policy: RetryPolicy | None = None) -> KubeApi:
        configuration = k8s.Configuration()
        try:
            # try_refresh_token: bound service-account tokens expire; the loader re-reads the file.
            k8s_config.load_incluster_config(client_configuration=configuration, try_refresh_token=True)
        except ConfigException as exc:
            raise GiveUp(f"cluster {cluster}: not running inside a Kubernetes pod: {exc}") from exc
        return cls(cluster, _api_client(configuration), policy)

    def close(self) -> None:
        self.api_client.close()

    # --- requests -------------------------------------------------------------------------------
    def _count(self, verb: str, outcome: str) -> None:
        with self._lock:
            self.requests += 1
        KUBERNETES_REQUESTS.labels(cluster=self.cluster, verb=verb, outcome=outcome).inc()

    def call(self, verb: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict | None:
        """Send one request (``method`` is a bound method of ``self.core`` / ``networking`` / ``rbac``)
        with retries; return the parsed JSON body (None when empty)."""
        policy = self.policy
        kwargs.setdefault("_request_timeout", (policy.connect_timeout, policy.read_timeout))
        kwargs["_preload_content"] = False
        no_retry: set[int] = kwargs.pop("_no_retry", set())
        what = f"{verb} {getattr(method, '__name__', method)}{args[:2]!r}"[:300]
        for attempt in range(1, policy.attempts + 1):
            retry_after: float | None = None
            try:
                response = method(*args, **kwargs)
                data = response.data
                response.release_conn()
            except ApiException as exc:
                reason, message = _describe(exc)
                status = exc.status or 0
                if status in RETRYABLE_STATUSES:
                    self._count(verb, "throttled" if status == 429 else "server_error")
                    retry_after = _retry_after(exc)
                    error_class = TooManyRequests if status == 429 else RetryLater
                    error: Exception = error_class(f"cluster {self.cluster}: {what}: HTTP {status} {reason}: {message}")
                    if status in no_retry:
                        raise error from exc
                else:
                    self._count(verb, _outcome(status))
                    raise _final_error(self.cluster, what, status, reason, message) from exc
            except AttributeError as exc:
                # The client turns a TLS failure into ApiException(status=0) without a body, then
                # fails decoding that body (kubernetes 36): unwrap it.
                inner = exc.__context__
                if not (isinstance(inner, ApiException) and not inner.status):
                    raise
                self._count(verb, "tls_error")
                raise GiveUp(f"cluster {self.cluster}: {what}: TLS handshake failed: {inner.reason}") from inner
            except urllib3.exceptions.SSLError as exc:
                # A TLS failure (unknown CA, wrong certificate, not TLS at all) is configuration:
                # repeating the handshake will not fix it.
                self._count(verb, "tls_error")
                raise GiveUp(f"cluster {self.cluster}: {what}: TLS handshake failed: {exc}") from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                # Timeouts, refused/reset connections, TLS errors: the request may or may not have
                # been applied; every call we make is safe to repeat.
                timeout = isinstance(exc, urllib3.exceptions.TimeoutError)
                self._count(verb, "timeout" if timeout else "connection_error")
                error = RetryLater(f"cluster {self.cluster}: {what}: {'timed out' if timeout else 'connection failed'}: {exc}")
            else:
                self._count(verb, "ok")
                return json.loads(data) if data else None
            if attempt == policy.attempts:
                raise error
            wait = min(policy.max_backoff, policy.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            if retry_after is not None:
                wait = min(policy.max_backoff, max(wait, retry_after))
            logger.info("retrying in %.2fs (attempt %s of %s): %s", wait, attempt + 1, policy.attempts, error)
            self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def list_all(self, verb: str, method: Callable[..., Any], *args: Any, page_size: int = 500, **kwargs: Any) -> list[dict]:
        """Every item of a LIST, fetched in pages of ``page_size`` so one response stays bounded."""
        items: list[dict] = []
        token = ""
        while True:
            page = self.call(verb, method, *args, limit=page_size, _continue=token or None, **kwargs) or {}
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return items


def _api_client(configuration: k8s.Configuration) -> k8s.ApiClient:
    # Retries are ours (bounded, with backoff and metrics); urllib3's own would silently repeat a
    # timed-out GET three more times.
    configuration.retries = False
    # Room for the driver's thread pool (the default is 5 per CPU; extra connections would be
    # opened and discarded on every request).
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, 32)
    return k8s.ApiClient(configuration)


def _retry_after(exc: ApiException) -> float | None:
    headers = exc.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _outcome(status: int) -> str:
    return {404: "not_found", 409: "conflict", 403: "forbidden", 401: "unauthorized", 422: "invalid"}.get(status, "error")


def _final_error(cluster: str, what: str, status: int, reason: str, message: str) -> Exception:
    text = f"cluster {cluster}: {what}: HTTP {status} {reason}: {message}"
    if status == 404:
        return NotFound(text)
    if status == 409:
        return AlreadyExists(text) if reason == "AlreadyExists" else Conflict(text)
    if status == 410:  # an expired list continue token: start the list again
        return RetryLater(text)
    if reason == "NamespaceTerminating":  # creating in a namespace being deleted: works once it is gone
        return RetryLater(text)
    return GiveUp(text)


# --- one client per registered cluster ------------------------------------------------------------
_CLIENTS: dict[tuple, KubeApi] = {}
_CLIENTS_LOCK = threading.Lock()


def api_for(cluster: str, *, connection: str, kubeconfig_path: str = "", context: str = "",
            policy: RetryPolicy | None = None) -> KubeApi:
    """The cached client of a cluster; a changed path/context (or kubeconfig file) gives a new one."""
    mtime = None
    if connection == "kubeconfig":
        try:
            mtime = os.stat(kubeconfig_path).st_mtime
        except OSError as exc:
            raise GiveUp(f"cluster {cluster}: kubeconfig {kubeconfig_path!r} is not readable: {exc}") from exc
    key = (cluster, connection, kubeconfig_path, context, mtime, policy)
    with _CLIENTS_LOCK:
        api = _CLIENTS.get(key)
        if api is None:
            if connection == "in_cluster":
                api = KubeApi.in_cluster(cluster, policy)
            elif connection == "kubeconfig":
                api = KubeApi.from_kubeconfig(cluster, kubeconfig_path, context, policy)
            else:
                raise GiveUp(f"cluster {cluster}: connection {connection!r} has no Kubernetes API")
            for old in [k for k in _CLIENTS if k[0] == cluster]:
                _CLIENTS.pop(old).close()
            _CLIENTS[key] = api
    return api
