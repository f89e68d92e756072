"""A small stateful fake Kubernetes API server over real HTTP, for the real ``kubernetes`` client.

It behaves like kube-apiserver for what the scheduler uses, so tests assert on the resulting
objects instead of on calls to a mock:

- core/v1 nodes (+status), namespaces, pods (+status, +eviction), resourcequotas, limitranges,
  events; networking.k8s.io/v1 networkpolicies; rbac.authorization.k8s.io/v1 roles, rolebindings;
- GET / LIST (label selectors ``= == != in notin exists !exists``, field selectors, ``limit`` +
  ``continue`` paging), POST, PUT, PATCH (strategic merge, JSON merge, JSON patch), DELETE;
- ``metadata.resourceVersion`` from one counter bumped by every write; a stale resourceVersion in
  a PUT or PATCH body is 409 Conflict; creating an existing name is 409 AlreadyExists; 404
  NotFound; 422 Invalid for a missing or malformed name or label; namespaced writes need the
  namespace to exist (NamespaceLifecycle); errors are ``Status`` bodies like the real server's;
- status subresources as the real server does them: writes to a Node or Pod keep the old status,
  ``/status`` writes change only the status; pods created get ``status.phase: Pending``;
- graceful pod deletion: a pod bound to a node (``spec.nodeName``) with a grace period gets a
  ``deletionTimestamp`` and stays until its kubelet confirms (``FakeKube.finish_terminations``)
  or it is deleted with grace period 0 — exactly what a real server does for a node without a
  kubelet; the ``eviction`` subresource deletes the pod that way (no PodDisruptionBudgets here).

Deleting a namespace removes it and its objects at once (a real server keeps it ``Terminating``
for a few seconds while its controller empties it).

Fault injection (``fail``, ``delay``) and a request log (``count``) let tests provoke 500/409/429,
slow responses and timeouts, and count the requests a driver sends.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    field_labels: tuple[str, ...] = ()
    has_status: bool = False  # status only through the /status subresource

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


KINDS = [
    Kind("", "v1", "nodes", "Node", False, ("spec.unschedulable",), has_status=True),
    Kind("", "v1", "namespaces", "Namespace", False, ("status.phase",), has_status=True),
    Kind("", "v1", "pods", "Pod", True, ("spec.nodeName", "status.phase", "spec.restartPolicy",
                                         "spec.schedulerName", "spec.serviceAccountName", "status.podIP",
                                         "status.nominatedNodeName"), has_status=True),
    Kind("", "v1", "resourcequotas", "ResourceQuota", True, has_status=True),
    Kind("", "v1", "limitranges", "LimitRange", True),
    Kind("", "v1", "events", "Event", True, ("involvedObject.kind", "involvedObject.name", "involvedObject.namespace",
                                             "involvedObject.uid", "reason", "type", "source",
                                             "reportingComponent")),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
]
KIND_BY_PATH = {(k.group, k.version, k.plural): k for k in KINDS}

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _not_found(kind: Kind, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind.plural} "{name}" not found',
                    {"name": name, "group": kind.group, "kind": kind.plural})


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- selectors --------------------------------------------------------------------------------------
def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str) -> list[tuple[str, str, set[str]]]:
    requirements = []
    for part in _split_top(text):
        match = re.fullmatch(r"(\S+)\s+(in|notin)\s+\(([^)]*)\)", part)
        if match:
            values = {v.strip() for v in match.group(3).split(",") if v.strip()}
            requirements.append((match.group(1), match.group(2), values))
            continue
        match = re.fullmatch(r"(\S+?)\s*(==|!=|=)\s*(\S*)", part)
        if match:
            op = {"==": "=", "=": "=", "!=": "!="}[match.group(2)]
            requirements.append((match.group(1), op, {match.group(3)}))
            continue
        match = re.fullmatch(r"(!?)([^\s!=()]+)", part)
        if match:
            requirements.append((match.group(2), "!exists" if match.group(1) else "exists", set()))
            continue
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")
    for key, _, values in requirements:
        if not _LABEL_NAME.match(key.split("/")[-1]) or any(not _LABEL_VALUE.match(v) or len(v) > 63 for v in values):
            raise ApiError(400, "BadRequest", f"invalid label selector {text!r}")
    return requirements


def label_matches(labels: dict[str, str], requirements: list[tuple[str, str, set[str]]]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=" and not (present and value in values):
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and not (present and value in values):
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


def parse_field_selector(text: str, kind: Kind) -> list[tuple[str, str, str]]:
    requirements = []
    for part in _split_top(text):
        match = re.fullmatch(r"([^=!]+?)\s*(==|!=|=)\s*(.*)", part)
        if not match:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        path = match.group(1)
        if path not in ("metadata.name", "metadata.namespace") + kind.field_labels:
            raise ApiError(400, "BadRequest", f'field label not supported: {path}')
        requirements.append((path, "!=" if match.group(2) == "!=" else "=", match.group(3)))
    return requirements


def _field_value(obj: dict, path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def field_matches(obj: dict, requirements: list[tuple[str, str, str]]) -> bool:
    return all((_field_value(obj, path) == value) == (op == "=") for path, op, value in requirements)


# --- patches ----------------------------------------------------------------------------------------
# Lists the strategic merge patch merges by key (a subset of the real schema's patchMergeKey tags);
# every other list, node taints included, is replaced whole.
_MERGE_KEYS = {"conditions": "type", "containers": "name", "initContainers": "name", "ownerReferences": "uid",
               "volumes": "name", "env": "name", "addresses": "type"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, key: str = "") -> Any:
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in copy.deepcopy(patch).items() if k != "$patch"}
        if patch.get("$patch") == "delete":
            return None
        result = copy.deepcopy(target) if isinstance(target, dict) else {}
        for name, value in patch.items():
            if name.startswith("$"):
                continue  # $setElementOrder/$retainKeys directives: ordering hints only here
            if value is None:
                result.pop(name, None)
            else:
                result[name] = strategic_merge_patch(result.get(name), value, name)
        return result
    if isinstance(patch, list) and key in _MERGE_KEYS and isinstance(target, list):
        merge_key = _MERGE_KEYS[key]
        result = copy.deepcopy(target)
        for item in patch:
            if not isinstance(item, dict):
                return copy.deepcopy(patch)
            index = next((i for i, old in enumerate(result) if old.get(merge_key) == item.get(merge_key)), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    result.pop(index)
            elif index is None:
                result.append(copy.deepcopy(item))
            else:
                result[index] = strategic_merge_patch(result[index], item)
        return result
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def json_patch(target: dict, operations: list) -> dict:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(target)

    def parent(parts: list[str]) -> tuple[Any, str]:
        node: Any = doc
        for part in parts[:-1]:
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError) as exc:
                raise ApiError(422, "Invalid", f"the server rejected our request: path /{'/'.join(parts)} does not exist") from exc
        return node, parts[-1]

    def get(path: str) -> Any:
        node, last = parent(_pointer(path))
        try:
            return node[int(last)] if isinstance(node, list) else node[last]
        except (KeyError, IndexError, ValueError) as exc:
            raise ApiError(422, "Invalid", f"path {path} does not exist") from exc

    def remove(path: str) -> Any:
        node, last = parent(_pointer(path))
        try:
            return node.pop(int(last)) if isinstance(node, list) else node.pop(last)
        except (KeyError, IndexError, ValueError) as exc:
            raise ApiError(422, "Invalid", f"unable to remove nonexistent key: {path}") from exc

    def add(path: str, value: Any) -> None:
        node, last = parent(_pointer(path))
        if isinstance(node, list):
            if last == "-":
                node.append(value)
            else:
                node.insert(int(last), value)
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ApiError(422, "Invalid", f"cannot add at {path}")

    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ApiError(400, "BadRequest", "invalid JSON patch operation")
        kind, path = op["op"], op["path"]
        if kind == "add":
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(path)
        elif kind == "replace":
            get(path)
            remove(path)
            add(path, copy.deepcopy(op.get("value")))
        elif kind == "move":
            add(path, remove(op["from"]))
        elif kind == "copy":
            add(path, copy.deepcopy(get(op["from"])))
        elif kind == "test":
            if get(path) != op.get("value"):
                raise ApiError(422, "Invalid", f"the server rejected our request: test failed at {path}")
        else:
            raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    return doc


# --- faults -----------------------------------------------------------------------------------------
@dataclass
class Fault:
    method: str
    path: re.Pattern
    times: int
    status: int | None = None  # respond with this error status
    delay: float = 0.0  # seconds to wait before answering (past the client timeout = a hang)
    headers: dict[str, str] = field(default_factory=dict)

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method) and bool(self.path.search(path))


_ERROR_REASONS = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                  403: "Forbidden", 422: "Invalid", 504: "Timeout", 401: "Unauthorized"}


# --- the server -------------------------------------------------------------------------------------
class FakeKube:
    """The store, the fault table and the request log, plus the HTTP server serving them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.revision = 1
        self.lock = threading.RLock()
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str]] = []  # (method, path with query)
        self.log_users: list[str] = []  # the bearer token of each logged request, in step with log
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        # False: a deleted namespace stays Terminating until ``finish_namespace_deletions`` (what the
        # real namespace controller does over a few seconds); True: it goes at once.
        self.namespaces_vanish_at_once = True

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> FakeKube:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-kube", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def write_kubeconfig(self, path: str | Path, context: str = "fake", token: str = "fake-token") -> str:
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        }
        Path(path).write_text(json.dumps(config))
        return str(path)

    # --- test controls ----------------------------------------------------------------------------
    def fail(self, method: str, path: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next ``times`` requests whose method and path (regex, searched) match get ``status``."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), times, status=status, headers=headers or {}))

    def delay(self, method: str, path: str, seconds: float, times: int = 1) -> None:
        """The next ``times`` matching requests are answered after ``seconds`` (a hang if that is
        longer than the client's read timeout)."""
        with self.lock:
            self.faults.append(Fault(method.upper(), re.compile(path), times, delay=seconds))

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests logged with that method (any if None) whose path contains ``path``."""
        with self.lock:
            return sum(1 for m, p in self.log if (method is None or m == method.upper()) and path in p)

    def requests_of(self, token: str) -> list[tuple[str, str]]:
        """The logged (method, path) of the requests authenticated with ``token``."""
        with self.lock:
            return [entry for entry, user in zip(self.log, self.log_users, strict=True) if user == token]

    def reset_log(self) -> None:
        with self.lock:
            self.log.clear()
            self.log_users.clear()

    def get(self, plural: str, name: str, namespace: str = "") -> dict | None:
        with self.lock:
            obj = self.objects.get((plural, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def list(self, plural: str, namespace: str | None = None) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (p, ns, _), o in sorted(self.objects.items())
                    if p == plural and (namespace is None or ns == namespace)]

    def put_object(self, plural: str, obj: dict) -> dict:
        """Store an object as given (a test's fixture), with server metadata added."""
        kind = next(k for k in KINDS if k.plural == plural)
        with self.lock:
            stored = self._store(kind, copy.deepcopy(obj), keep_status=True)
        return copy.deepcopy(stored)

    def add_node(self, name: str, *, gpus: int = 8, ready: bool = True, labels: dict | None = None,
                 taints: list | None = None, hostname_label: bool = True, unschedulable: bool = False) -> dict:
        return self.put_object("nodes", node_manifest(name, gpus=gpus, ready=ready, labels=labels, taints=taints,
                                                      hostname_label=hostname_label, unschedulable=unschedulable))

    def add_namespace(self, name: str) -> dict:
        return self.put_object("namespaces", {"metadata": {"name": name}})

    def add_pod(self, namespace: str, name: str, node: str, *, owner_kind: str | None = None,
                phase: str = "Running") -> dict:
        if self.get("namespaces", namespace) is None:
            self.add_namespace(namespace)
        pod = pod_manifest(namespace, name, node, owner_kind=owner_kind)
        pod["status"] = {"phase": phase}
        return self.put_object("pods", pod)

    def set_node_ready(self, name: str, ready: bool) -> None:
        with self.lock:
            node = self.objects[("nodes", "", name)]
            node["status"]["conditions"] = [_ready_condition(ready)]
            self._bump(node)

    def delete_node(self, name: str) -> None:
        """A node that disappears (decommissioned, or the cloud provider removed it)."""
        with self.lock:
            self.objects.pop(("nodes", "", name), None)
            self._bump_revision()

    def _empty_namespace(self, name: str) -> None:
        for key in [k for k in self.objects if k[1] == name and k[0] != "namespaces"]:
            del self.objects[key]

    def finish_namespace_deletions(self) -> int:
        """What the namespace controller does: empty the Terminating namespaces and remove them."""
        with self.lock:
            doomed = [key for key, obj in self.objects.items()
                      if key[0] == "namespaces" and obj["metadata"].get("deletionTimestamp")]
            for key in doomed:
                self._empty_namespace(key[2])
                del self.objects[key]
            self._bump_revision()
            return len(doomed)

    def finish_terminations(self) -> int:
        """What kubelets do: remove the pods whose graceful deletion has started."""
        with self.lock:
            doomed = [key for key, obj in self.objects.items()
                      if key[0] == "pods" and obj["metadata"].get("deletionTimestamp")]
            for key in doomed:
                del self.objects[key]
            self._bump_revision()
            return len(doomed)

    # --- storage helpers --------------------------------------------------------------------------
    def _bump_revision(self) -> str:
        self.revision += 1
        return str(self.revision)

    def _bump(self, obj: dict) -> None:
        obj["metadata"]["resourceVersion"] = self._bump_revision()

    def _store(self, kind: Kind, obj: dict, keep_status: bool) -> dict:
        meta = obj.setdefault("metadata", {})
        obj["kind"], obj["apiVersion"] = kind.kind, kind.api_version
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        if kind.kind == "Namespace":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        if kind.kind == "Pod":
            obj.setdefault("spec", {}).setdefault("terminationGracePeriodSeconds", 30)
            if not keep_status:
                obj["status"] = {"phase": "Pending"}
        self._bump(obj)
        self.objects[(kind.plural, meta.get("namespace", ""), meta["name"])] = obj
        return obj

    # --- request handling -------------------------------------------------------------------------
    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    return fault
        return None

    def handle(self, method: str, path: str, query: dict[str, str], body: Any, content_type: str) -> tuple[int, dict]:
        route = self._route(path)
        if route is None:
            return self._discovery(path)
        kind, namespace, name, subresource = route
        with self.lock:
            if method == "GET" and name is None:
                return 200, self._list(kind, namespace, query)
            if method == "GET":
                return 200, copy.deepcopy(self._existing(kind, namespace, name))
            if method == "POST" and subresource == "eviction":
                return self._evict(namespace, name)
            if method == "POST" and name is None:
                return 201, copy.deepcopy(self._create(kind, namespace, body))
            if method == "PUT" and name is not None:
                current = self._existing(kind, namespace, name)
                return 200, copy.deepcopy(self._update(kind, current, body, subresource))
            if method == "PATCH" and name is not None:
                current = self._existing(kind, namespace, name)
                patched = self._apply_patch(current, body, content_type)
                return 200, copy.deepcopy(self._update(kind, current, patched, subresource))
            if method == "DELETE" and name is not None:
                return self._delete(kind, namespace, name, query, body)
        raise ApiError(405, "MethodNotAllowed", f"the server does not allow this method on the requested resource")

    def _route(self, path: str) -> tuple[Kind, str, str | None, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = ""
        if len(rest) >= 3 and rest[0] == "namespaces" and (group, version, rest[2]) in KIND_BY_PATH:
            namespace, rest = rest[1], rest[2:]
        if not rest or (group, version, rest[0]) not in KIND_BY_PATH:
            return None
        kind = KIND_BY_PATH[(group, version, rest[0])]
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource not in (None, "status", "eviction") or (subresource == "eviction" and kind.kind != "Pod"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if kind.namespaced and name is not None and not namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return kind, namespace, name, subresource

    def _discovery(self, path: str) -> tuple[int, dict]:
        if path.rstrip("/") == "/version":
            return 200, {"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake"}
        if path.rstrip("/") == "/api":
            return 200, {"kind": "APIVersions", "versions": ["v1"]}
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _existing(self, kind: Kind, namespace: str, name: str) -> dict:
        obj = self.objects.get((kind.plural, namespace, name))
        if obj is None:
            raise _not_found(kind, name)
        return obj

    def _list(self, kind: Kind, namespace: str, query: dict[str, str]) -> dict:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), kind)
        keys = sorted(k for k in self.objects if k[0] == kind.plural and (not namespace or k[1] == namespace))
        start = query.get("continue", "")
        if start:
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(start)))
            except ValueError as exc:
                raise ApiError(400, "BadRequest", "continue key is not valid") from exc
            keys = [k for k in keys if k > after]
        limit = int(query.get("limit") or 0)
        items, token = [], ""
        for key in keys:
            obj = self.objects[key]
            if label_matches(obj["metadata"].get("labels") or {}, labels) and field_matches(obj, fields):
                if limit and len(items) == limit:
                    token = base64.urlsafe_b64encode(json.dumps(list(last)).encode()).decode()
                    break
                item = copy.deepcopy(obj)
                item.pop("kind", None)  # list items carry no kind/apiVersion, as on the real server
                item.pop("apiVersion", None)
                items.append(item)
                last = key
        meta: dict[str, Any] = {"resourceVersion": str(self.revision)}
        if token:
            meta["continue"] = token
        return {"kind": f"{kind.kind}List", "apiVersion": kind.api_version, "metadata": meta, "items": items}

    def _validate(self, kind: Kind, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the request body is not a JSON object")
        meta = obj.get("metadata") or {}
        name = meta.get("name") or ""
        causes = []
        if not name:
            causes.append({"reason": "FieldValueRequired", "message": "Required value: name or generateName is required",
                           "field": "metadata.name"})
        elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name) or (kind.kind == "Namespace" and not _DNS_LABEL.match(name)):
            causes.append({"reason": "FieldValueInvalid", "message": f"Invalid value: {name!r}", "field": "metadata.name"})
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, label = key.rpartition("/")
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value) \
                    or len(label) > 63 or not _LABEL_NAME.match(label) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
                causes.append({"reason": "FieldValueInvalid", "message": f"Invalid value: {value!r}",
                               "field": f"metadata.labels[{key}]"})
        if kind.kind == "Node":
            for taint in (obj.get("spec") or {}).get("taints") or []:
                if taint.get("effect") not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not taint.get("key"):
                    causes.append({"reason": "FieldValueInvalid", "message": "invalid taint", "field": "spec.taints"})
        if kind.kind == "Event":
            involved = obj.get("involvedObject") or {}
            if involved.get("namespace", "") != meta.get("namespace", ""):
                causes.append({"reason": "FieldValueInvalid", "message": "does not match event.namespace",
                               "field": "involvedObject.namespace"})
        if kind.kind == "Pod":
            containers = (obj.get("spec") or {}).get("containers") or []
            if not containers or any(not c.get("name") or not c.get("image") for c in containers):
                causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": "spec.containers"})
        if causes:
            message = f'{kind.kind} "{name}" is invalid: ' + ", ".join(f"{c['field']}: {c['message']}" for c in causes)
            raise ApiError(422, "Invalid", message, {"name": name, "group": kind.group, "kind": kind.kind, "causes": causes})

    def _check_namespace(self, kind: Kind, namespace: str, creating: bool) -> None:
        if not kind.namespaced:
            return
        ns = self.objects.get(("namespaces", "", namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if creating and ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {namespace} because it is being terminated",
                           {"causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                                        "message": f"namespace {namespace} is being terminated"}]})

    def _create(self, kind: Kind, namespace: str, body: Any) -> dict:
        if isinstance(body, dict) and not (body.get("metadata") or {}).get("name") and (body.get("metadata") or {}).get("generateName"):
            body["metadata"]["name"] = body["metadata"]["generateName"] + uuid.uuid4().hex[:5]
        self._validate(kind, body)
        meta = body["metadata"]
        if kind.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        self._check_namespace(kind, namespace, creating=True)
        if (kind.plural, namespace, meta["name"]) in self.objects:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": kind.group, "kind": kind.plural})
        for server_field in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp"):
            meta.pop(server_field, None)
        if kind.kind == "Node":
            # The TaintNodesByCondition admission plugin: a new node is not-ready until the node
            # controller has seen it Ready (this fake has no controllers: tests remove the taint).
            taints = body.setdefault("spec", {}).setdefault("taints", [])
            if not any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints):
                taints.append({"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"})
        # Nodes are registered with their status (that is how a kubelet creates them); other kinds
        # start from an empty one.
        return self._store(kind, body, keep_status=kind.kind == "Node")

    def _update(self, kind: Kind, current: dict, new: Any, subresource: str | None) -> dict:
        self._validate(kind, new)
        meta = new["metadata"]
        if meta["name"] != current["metadata"]["name"]:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
        requested = meta.get("resourceVersion")
        if requested and requested != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.plural} "{meta["name"]}": the object '
                           "has been modified; please apply your changes to the latest version and try again",
                           {"name": meta["name"], "group": kind.group, "kind": kind.plural})
        if kind.kind == "RoleBinding" and new.get("roleRef") != current.get("roleRef"):
            raise ApiError(422, "Invalid", f'RoleBinding.rbac.authorization.k8s.io "{meta["name"]}" is invalid: '
                           "roleRef: Invalid value: cannot change roleRef")
        self._check_namespace(kind, current["metadata"].get("namespace", ""), creating=False)
        result = copy.deepcopy(new)
        if subresource == "status":
            # Only the status changes through /status.
            result = copy.deepcopy(current)
            result["status"] = copy.deepcopy(new.get("status"))
        elif kind.has_status:
            result["status"] = copy.deepcopy(current.get("status"))
        for server_field in ("uid", "creationTimestamp", "namespace", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if server_field in current["metadata"]:
                result["metadata"][server_field] = current["metadata"][server_field]
            else:
                result["metadata"].pop(server_field, None)
        result["kind"], result["apiVersion"] = kind.kind, kind.api_version
        if kind.kind == "Namespace":
            result["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        if _same_content(result, current):
            return current  # a no-op write does not bump the resourceVersion
        self._bump(result)
        self.objects[(kind.plural, current["metadata"].get("namespace", ""), meta["name"])] = result
        return result

    def _apply_patch(self, current: dict, body: Any, content_type: str) -> dict:
        content_type = content_type.split(";")[0].strip()
        if content_type == "application/strategic-merge-patch+json":
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "strategic merge patch must be an object")
            return strategic_merge_patch(current, body)
        if content_type == "application/merge-patch+json":
            return merge_patch(current, body)
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "BadRequest", "JSON patch must be a list")
            return json_patch(current, body)
        raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")

    def _graceful_delete(self, pod: dict, grace: int | None) -> bool:
        """True when the pod is gone; False when it is now terminating (like the real server)."""
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        phase = (pod.get("status") or {}).get("phase")
        if not pod["spec"].get("nodeName") or phase in ("Succeeded", "Failed"):
            grace = 0
        key = ("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if grace == 0:
            del self.objects[key]
            self._bump_revision()
            return True
        if not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"]["deletionTimestamp"] = _now()
            pod["metadata"]["deletionGracePeriodSeconds"] = grace
            self._bump(pod)
        return False

    def _evict(self, namespace: str, name: str) -> tuple[int, dict]:
        kind = KIND_BY_PATH[("", "v1", "pods")]
        pod = self._existing(kind, namespace, name)
        self._graceful_delete(pod, None)
        return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _delete(self, kind: Kind, namespace: str, name: str, query: dict[str, str], body: Any) -> tuple[int, dict]:
        obj = self._existing(kind, namespace, name)
        options = body if isinstance(body, dict) else {}
        preconditions = options.get("preconditions") or {}
        for key in ("uid", "resourceVersion"):
            if preconditions.get(key) and preconditions[key] != obj["metadata"].get(key):
                raise ApiError(409, "Conflict", f'Precondition failed: {key} in precondition: {preconditions[key]}, '
                               f'{key} in object meta: {obj["metadata"].get(key)}',
                               {"name": name, "group": kind.group, "kind": kind.plural})
        grace = options.get("gracePeriodSeconds")
        if "gracePeriodSeconds" in query:
            grace = int(query["gracePeriodSeconds"])
        if kind.kind == "Pod":
            gone = self._graceful_delete(obj, grace)
            return 200, copy.deepcopy(obj if not gone else obj)
        del self.objects[(kind.plural, namespace, name)]
        self._bump_revision()
        if kind.kind == "Namespace":
            if not self.namespaces_vanish_at_once:
                self.objects[(kind.plural, namespace, name)] = obj
                if not obj["metadata"].get("deletionTimestamp"):
                    obj["metadata"]["deletionTimestamp"] = _now()
                    obj["status"] = {"phase": "Terminating"}
                    self._bump(obj)
                return 200, copy.deepcopy(obj)
            self._empty_namespace(name)
            gone = copy.deepcopy(obj)
            gone["metadata"]["deletionTimestamp"] = _now()
            gone["status"] = {"phase": "Terminating"}
            return 200, gone
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": name, "group": kind.group, "kind": kind.plural, "uid": obj["metadata"]["uid"]}}


def _same_content(a: dict, b: dict) -> bool:
    strip = lambda o: {**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"}}  # noqa: E731
    return strip(a) == strip(b)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real server
    server_fake: FakeKube

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Answer at once: without this, Nagle's algorithm and the client's delayed ACK add ~40 ms
        # to every keep-alive response.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        fake = self.server_fake
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with fake.lock:
            fake.log.append((self.command, self.path))
            fake.log_users.append((self.headers.get("Authorization") or "").removeprefix("Bearer "))
        fault = fake.take_fault(self.command, split.path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        try:
            if fault is not None and fault.status:
                reason = _ERROR_REASONS.get(fault.status, "InternalError")
                raise ApiError(fault.status, reason, f"injected fault: {reason}")
            try:
                body = json.loads(raw) if raw else None
            except ValueError as exc:
                raise ApiError(400, "BadRequest", f"the request body is not valid JSON: {exc}") from exc
            code, payload = fake.handle(self.command, split.path, query, body, self.headers.get("Content-Type", ""))
            headers = {}
        except ApiError as exc:
            code, payload = exc.code, exc.status()
            headers = dict(fault.headers) if fault is not None else {}
            if exc.code == 429:
                headers.setdefault("Retry-After", "1")
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, value)
            # Headers and body in one write (one TCP segment for small answers).
            self._headers_buffer.append(b"\r\n" + data)
            self.flush_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


# --- object builders shared by the tests (fake and real cluster) ----------------------------------
def _ready_condition(ready: bool) -> dict:
    now = _now()
    return {"type": "Ready", "status": "True" if ready else "False", "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": "", "lastHeartbeatTime": now, "lastTransitionTime": now}


def node_manifest(name: str, *, gpus: int = 8, ready: bool = True, labels: dict | None = None, taints: list | None = None,
                  hostname_label: bool = True, unschedulable: bool = False) -> dict:
    """A Node as a kubelet with the NVIDIA device plugin registers it."""
    node_labels = {"kubernetes.io/os": "linux", **({"kubernetes.io/hostname": name} if hostname_label else {}), **(labels or {})}
    resources = {"cpu": "96", "memory": "1056Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    spec: dict[str, Any] = {"taints": list(taints or [])}
    if unschedulable:
        spec["unschedulable"] = True
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels}, "spec": spec,
            "status": {"capacity": dict(resources), "allocatable": dict(resources), "conditions": [_ready_condition(ready)]}}


def pod_manifest(namespace: str, name: str, node: str, *, owner_kind: str | None = None) -> dict:
    """A pod bound to a node (no scheduler involved), tolerating every taint like a DaemonSet pod."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner_kind:
        metadata["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner_kind, "name": f"{name}-owner",
                                        "uid": str(uuid.uuid4()), "controller": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
                     "tolerations": [{"operator": "Exists"}], "automountServiceAccountToken": False}}
