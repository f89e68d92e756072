"""Booking engine: availability search latency, booking throughput under concurrency, double bookings.

Builds (or reuses) a synthetic fleet — ``--nodes`` nodes of 8 GPUs in 10 clusters, 3 regions and
topology domains of 32 nodes, with ``--reservations`` past, current and future single-node
reservations — loaded in bulk (COPY on PostgreSQL, multi-row INSERT elsewhere). Then measures:

- availability search as the API runs it (parameter lookups, policy checks, free-node query,
  offers) against the same free-node query written by hand in SQL (the floor);
- earliest-start searches over the default horizon, and the capacity calendar for 14 days by hour;
- booking latency, one booking at a time, in the weeks where the synthetic fleet is nearly full;
- bookings per second with 1, 4 and 16 clients, each with its own database connection calling
  ``reservation_create`` (the API's service) on overlapping windows: once as threads of this one
  process (top-level ``bookings``) and once as forked processes (``processes.bookings``);
- single-row INSERT transactions per second on the same database (the floor of a write), with
  the same client model and number of connections as the bookings it is compared with;
- double and partial bookings found afterwards by SQL (must be 0).
"""

import multiprocessing
import random
import statistics
import threading
import time
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.management import CommandError
from django.db import connection, connections, transaction
from django.test.utils import override_settings
from django.utils import timezone

from marketplace.core.exceptions import ServiceError
from marketplace.core.services import Actor
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, Node, Region
from marketplace.reservations import policies, selectors, services
from marketplace.reservations.models import Allocation, Reservation
from marketplace.tenants.models import Membership, Tenant

PREFIX = "bench"
MODELS = [("BENCH-H100", 0.8, Decimal("2.4900")), ("BENCH-B200", 0.2, Decimal("4.1900"))]
CLUSTERS = 10
REGIONS = ["bench-us", "bench-eu", "bench-ap"]
DOMAIN_SIZE = 32
TENANTS = 64
# The first statement of a booking attempt on PostgreSQL: the booking function, or the two-statement
# path's first (where Python's policies decide: refusals, prices this process has not seen).
ATTEMPT_MARKERS = (f"SELECT * FROM {services.BOOK_FUNCTION}(", "WITH tenant AS")


def add_arguments(parser) -> None:
    parser.add_argument("--nodes", type=int, default=25_000)
    parser.add_argument("--reservations", type=int, default=1_000_000)
    parser.add_argument("--searches", type=int, default=300, help="availability searches to time")
    parser.add_argument("--earliest", type=int, default=10, help="earliest-start searches (14-day horizon) to time")
    parser.add_argument("--bookings", type=int, default=240, help="bookings per concurrency level")
    parser.add_argument("--busy-bookings", type=int, default=60,
                        help="bookings to time, one at a time, in the weeks the synthetic fleet is nearly full")
    parser.add_argument("--floor-seconds", type=float, default=2.0, help="how long each INSERT floor run lasts")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each floor and booking level; the median run is reported (a run is short)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--clients", choices=("both", *CLIENT_MODELS), default="both",
                        help="run the concurrent clients as threads of one process, as processes, or both")


def run(options, stdout) -> dict:
    # Measured as production runs: with DEBUG on (DJANGO_ENV=development), Django would also render
    # and keep every statement with its parameters in a query log, which no deployment pays for.
    with override_settings(DEBUG=False):
        return _run(options, stdout)


def _run(options, stdout) -> dict:
    repeat = max(1, options["repeat"])
    last_week = _booking_week(len(BOOKING_CLIENTS) * len(CLIENT_MODELS) * repeat)
    if last_week > policies.policy("MAX_LEAD_TIME"):
        raise CommandError(f"--repeat {repeat} books up to {last_week.days} days ahead, beyond the booking lead-time "
                           f"policy ({policies.policy('MAX_LEAD_TIME').days} days): repeat fewer times.")
    rng = random.Random(options["seed"])
    started = time.monotonic()
    fleet = _ensure_fleet(nodes=options["nodes"], reservations=options["reservations"], rng=rng, stdout=stdout)
    load_seconds = time.monotonic() - started
    figures: dict = {
        "database": connection.vendor,
        "nodes": fleet["nodes"], "gpus": fleet["nodes"] * 8, "reservations": fleet["reservations"],
        "fleet_built": fleet["built"], "fleet_seconds": round(load_seconds, 1),
    }
    stdout.write(f"fleet ready in {load_seconds:.1f}s: {fleet}\n")
    figures["search"] = _measure_search(count=options["searches"], rng=rng)
    stdout.write(f"search: {figures['search']}\n")
    figures["earliest"] = _measure_earliest(count=options["earliest"], rng=rng)
    figures["capacity"] = _measure_capacity()
    stdout.write(f"earliest: {figures['earliest']}\ncapacity: {figures['capacity']}\n")
    figures["busy_bookings"] = _measure_busy_bookings(count=options["busy_bookings"], rng=rng)
    stdout.write(f"bookings in a busy fleet: {figures['busy_bookings']}\n")
    # Two client models, each measured against its own INSERT floor: "threads" (top-level
    # insert_floor_tx_per_s and bookings) are threads of this one process; "processes" are forked
    # processes, one per client. Each booking run books its own week, so the runs do not interfere;
    # each figure is the median of --repeat runs (a run lasts about a second, so one run is noisy).
    # A round measures the floors and then the bookings, one run each, so that each booking run has
    # floors measured moments before it: the machine's speed drifts by more than the figures differ
    # over the minutes a whole benchmark takes, and the targets compare each round's own pair.
    models = CLIENT_MODELS if options["clients"] == "both" else (options["clients"],)
    for offset, model in enumerate(CLIENT_MODELS):
        if model not in models:
            continue
        section = figures if model == "threads" else figures.setdefault("processes", {})
        floors: dict[str, list] = {str(c): [] for c in FLOOR_CLIENTS}
        runs: dict[str, list] = {str(c): [] for c in BOOKING_CLIENTS}
        for run in range(repeat):
            for clients in FLOOR_CLIENTS:
                floors[str(clients)].append(_insert_floor(clients=clients, seconds=options["floor_seconds"],
                                                          model=model))
            for level, clients in enumerate(BOOKING_CLIENTS):
                week = (len(BOOKING_CLIENTS) * offset + level) * repeat + run
                runs[str(clients)].append(_measure_bookings(clients=clients, total=options["bookings"], level=week,
                                                            seed=options["seed"], model=model))
        section["insert_floor_tx_per_s"] = {clients: statistics.median(values) for clients, values in floors.items()}
        section["insert_floor_runs_tx_per_s"] = floors
        stdout.write(f"insert floor ({model}): {floors}\n")
        section["bookings"] = {}
        for clients, measured in runs.items():
            median = sorted(measured, key=lambda result: result["bookings_per_s"])[len(measured) // 2]
            section["bookings"][clients] = median | {"runs_per_s": [result["bookings_per_s"] for result in measured]}
            stdout.write(f"bookings with {clients} clients ({model}): {section['bookings'][clients]}\n")
    figures["double_bookings"] = _double_bookings()
    figures["partial_bookings"] = _partial_bookings()
    figures["server_errors"] = figures["busy_bookings"]["server_errors"] + sum(
        level["server_errors"] for section in (figures, figures.get("processes", {}))
        for level in section.get("bookings", {}).values())
    figures["targets"] = _targets(figures)
    return figures


# --- the synthetic fleet --------------------------------------------------------------------------

def _ensure_fleet(*, nodes: int, reservations: int, rng: random.Random, stdout) -> dict:
    existing = Node.objects.filter(cluster__name__startswith=f"{PREFIX}-").count()
    if existing:
        count = Reservation.objects.filter(tenant__slug__startswith=f"{PREFIX}-").count()
        return {"nodes": existing, "reservations": count, "built": False}
    now = timezone.now()
    with transaction.atomic():
        regions = [Region.objects.create(code=code, name=code) for code in REGIONS]
        models = []
        for name, _, price in MODELS:
            model = GpuModel.objects.create(name=name, memory_gb=80, gpus_per_node=8)
            for region in regions:
                GpuPrice.objects.create(gpu_model=model, region=region, currency="USD", price_per_gpu_hour=price)
            models.append(model)
        clusters = [Cluster.objects.create(name=f"{PREFIX}-c{i:02d}", region=regions[i % len(regions)])
                    for i in range(CLUSTERS)]
        from django.contrib.auth import get_user_model

        user, _ = get_user_model().objects.get_or_create(username=f"{PREFIX}-user")
        tenants = [Tenant.objects.create(slug=f"{PREFIX}-t{i:02d}", name=f"Bench {i}", gpu_quota=10_000_000)
                   for i in range(TENANTS)]
        Membership.objects.bulk_create([Membership(user=user, tenant=t, role="owner") for t in tenants])
        # Nodes: contiguous blocks per cluster, domains of DOMAIN_SIZE, models in proportion.
        node_rows = []
        for index in range(nodes):
            cluster = clusters[index * CLUSTERS // nodes]
            model = models[0] if (index % 10) < int(MODELS[0][1] * 10) else models[1]
            node_rows.append(Node(name=f"{PREFIX}-n{index:06d}", cluster=cluster, gpu_model=model, gpu_count=8,
                                  cpu_cores=224, memory_gb=2048, topology_domain=f"{cluster.name}-ib{(index // DOMAIN_SIZE) % 1000:03d}-{model.name[-4:]}",
                                  status=Node.Status.AVAILABLE, health=Node.Health.HEALTHY, created_at=now))
        Node.objects.bulk_create(node_rows, batch_size=5000)
    stdout.write(f"loading {reservations} reservations on {nodes} nodes...\n")
    node_list = list(Node.objects.filter(cluster__name__startswith=f"{PREFIX}-")
                     .values_list("pk", "cluster_id", "gpu_model_id"))
    prices = {model.pk: model.prices.first().price_per_gpu_hour for model in models}
    _load_reservations(node_list=node_list, total=reservations, tenants=[t.pk for t in tenants], user_id=user.pk,
                       prices=prices, now=now, rng=rng)
    return {"nodes": nodes, "reservations": reservations, "built": True}


def _timeline(*, per_node: int, now: datetime, rng: random.Random):
    """Back-to-back single-node bookings (4-72 h, gaps ≥ the cleaning gap), ~70 % in the past."""
    step = policies.granularity()
    gap = selectors.cleaning_gap()
    mean_slot = timedelta(hours=50)
    t = policies.floor_to_granularity(now - mean_slot * per_node * 0.7 + rng.random() * mean_slot)
    for _ in range(per_node):
        duration = step * rng.randint(16, 288)
        yield t, t + duration
        t = policies.ceil_to_granularity(t + duration + gap + step * rng.randint(0, 96))


def _status_at(start: datetime, end: datetime, now: datetime) -> str:
    if end <= now:
        return "completed"
    return "active" if start <= now else "confirmed"


def _load_reservations(*, node_list, total: int, tenants: list[int], user_id: int, prices: dict, now: datetime,
                       rng: random.Random, chunk: int = 100_000) -> None:
    gap = selectors.cleaning_gap()
    per_node = max(1, total // len(node_list))
    extra = total - per_node * len(node_list)
    res_rows, alloc_rows = [], []

    def flush():
        if connection.vendor == "postgresql":
            _copy("reservations_reservation",
                  ["id", "tenant_id", "created_by_id", "gpu_model_id", "cluster_id", "gpus", "same_domain",
                   "starts_at", "ends_at", "status", "status_reason", "status_changed_at", "currency", "unit_price",
                   "total_price", "idempotency_key", "request_fingerprint", "created_at", "updated_at"], res_rows)
            _copy("reservations_allocation", ["reservation_id", "node_id", "starts_at", "ends_at", "blocked_until",
                                              "state", "created_at"], alloc_rows)
        else:
            Reservation.objects.bulk_create(
                [Reservation(id=r[0], tenant_id=r[1], created_by_id=r[2], gpu_model_id=r[3], cluster_id=r[4], gpus=8,
                             starts_at=r[7], ends_at=r[8], status=r[9], currency="USD", unit_price=r[13],
                             total_price=r[14]) for r in res_rows], batch_size=2000)
            Allocation.objects.bulk_create(
                [Allocation(reservation_id=a[0], node_id=a[1], starts_at=a[2], ends_at=a[3], blocked_until=a[4],
                            state=a[5]) for a in alloc_rows], batch_size=2000)
        res_rows.clear()
        alloc_rows.clear()

    with transaction.atomic():
        if connection.vendor == "postgresql":
            # The generator writes consistent rows; skipping the per-row FK triggers during the bulk
            # load saves minutes. The exclusion constraint (an index, not a trigger) still checks every row.
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL session_replication_role = replica")
        for position, (node_id, cluster_id, model_id) in enumerate(node_list):
            count = per_node + (1 if position < extra else 0)
            for start, end in _timeline(per_node=count, now=now, rng=rng):
                rid = uuid.uuid4()
                status = _status_at(start, end, now)
                unit = prices[model_id]
                total_price = (unit * 8 * Decimal(int((end - start).total_seconds())) / 3600).quantize(Decimal("0.01"))
                res_rows.append((rid, rng.choice(tenants), user_id, model_id, cluster_id, 8, False, start, end, status,
                                 "", now, "USD", unit, total_price, "", "", now, now))
                alloc_rows.append((rid, node_id, start, end, end + gap,
                                   "released" if status == "completed" else "active", now))
            if len(res_rows) >= chunk:
                flush()
        flush()
    if connection.vendor == "postgresql":
        # What autovacuum would do shortly after a bulk load: statistics for the planner and the
        # visibility map that lets the free-node search run as an index-only scan.
        with connection.cursor() as cursor:
            for table in ("inventory_region", "inventory_cluster", "inventory_gpumodel", "inventory_gpuprice",
                          "inventory_node", "reservations_reservation", "reservations_allocation"):
                cursor.execute(f"VACUUM ANALYZE {table}")


def _copy(table: str, columns: list[str], rows: list[tuple]) -> None:
    with connection.cursor() as cursor:
        with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


# --- search ---------------------------------------------------------------------------------------

# The floor is the service's own free-node query run bare: no parameter lookups, no policy checks,
# no offers, and the active clusters of each region given.
FLOOR_SQL = selectors.FREE_NODE_COUNTS_SQL


def _percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return round(ordered[index], 2)


def _queries(count: int, rng: random.Random) -> list[dict]:
    now = timezone.now()
    step = policies.granularity()
    regions = [None] + REGIONS
    queries = []
    for _ in range(count):
        start = policies.ceil_to_granularity(now + step * rng.randint(4 * 24, 4 * 24 * 20))
        queries.append({"gpu_model": MODELS[0][0], "gpus": 8 * rng.choice([1, 2, 4, 8, 16, 32]), "start": start,
                        "end": start + step * rng.randint(4, 4 * 48), "region": rng.choice(regions),
                        "same_domain": rng.random() < 0.5})
    return queries


def _search_like_the_api(q: dict):
    model = selectors.gpu_model_by_name(q["gpu_model"])
    region = selectors.region_by_code(q["region"])
    policies.check_window(start=q["start"], end=q["end"])
    return selectors.availability_search(gpu_model=model, gpus=q["gpus"], start=q["start"], end=q["end"],
                                         region=region, same_domain=q["same_domain"])


def _measure_search(*, count: int, rng: random.Random) -> dict:
    queries = _queries(count, rng)
    for q in queries[:10]:  # warm caches and connections
        _search_like_the_api(q)
    service_ms, floor_ms, offers = [], [], 0
    model_id = GpuModel.objects.get(name=MODELS[0][0]).pk
    # The floor gets the active clusters of each region for free; the service looks them up.
    clusters = {code: list(Cluster.objects.filter(status="active", region__code=code).values_list("pk", flat=True))
                for code in REGIONS}
    clusters[None] = list(Cluster.objects.filter(status="active").values_list("pk", flat=True))
    for q in queries:
        t0 = time.perf_counter()
        found = _search_like_the_api(q)
        service_ms.append((time.perf_counter() - t0) * 1000)
        offers += bool(found.offers)
        if connection.vendor == "postgresql":
            params = {"model": model_id, "clusters": clusters[q["region"]], "start": q["start"],
                      "padded_end": q["end"] + selectors.cleaning_gap()}
            t0 = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute(FLOOR_SQL, params)
                cursor.fetchall()
            floor_ms.append((time.perf_counter() - t0) * 1000)
    result = {"searches": count, "with_offers": offers, "p50_ms": _percentile(service_ms, 50),
              "p95_ms": _percentile(service_ms, 95), "p99_ms": _percentile(service_ms, 99)}
    if floor_ms:
        result["sql_floor_p50_ms"] = _percentile(floor_ms, 50)
        result["sql_floor_p95_ms"] = _percentile(floor_ms, 95)
        result["p95_over_floor"] = round(result["p95_ms"] / max(result["sql_floor_p95_ms"], 0.001), 2)
    return result


def _measure_earliest(*, count: int, rng: random.Random) -> dict:
    """``earliest=true`` as the API runs it, over the default 14-day horizon: a mix of requests, some
    of which fit only days later or never (the horizon is then searched to its end)."""
    model = selectors.gpu_model_by_name(MODELS[0][0])
    step = policies.granularity()
    elapsed, found = [], 0
    for _ in range(count):
        start = policies.ceil_to_granularity(timezone.now() + step * rng.randint(4, 4 * 24 * 3))
        end = start + step * rng.randint(4 * 4, 4 * 24)
        t0 = time.perf_counter()
        result = selectors.availability_earliest(
            gpu_model=model, gpus=8 * rng.choice([4, 16, 32, 64, 256]), start=start, end=end,
            horizon=start + settings.MARKETPLACE["SEARCH_HORIZON"], same_domain=rng.random() < 0.5)
        elapsed.append((time.perf_counter() - t0) * 1000)
        found += bool(result.offers)
    if not elapsed:
        return {"searches": 0}
    return {"searches": count, "found": found, "p50_ms": _percentile(elapsed, 50), "max_ms": round(max(elapsed), 2)}


def _measure_capacity() -> dict:
    """The booking calendar: every model's free GPUs per hour over the next 14 days (median of 3)."""
    start = policies.ceil_to_granularity(timezone.now())
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        timeline = selectors.capacity_timeline(start=start, end=start + timedelta(days=14), step=timedelta(hours=1))
        runs.append((time.perf_counter() - t0) * 1000)
    return {"buckets": sum(len(series) for series in timeline.values()), "ms": round(statistics.median(runs), 2)}


# --- writes ---------------------------------------------------------------------------------------

def _book(*, user, tenant: Tenant, gpus: int, start: datetime, end: datetime, same_domain: bool) -> str:
    """One booking of the first model through the API's service: "booked", "refused" (a clear
    refusal) or "server_errors" (anything else)."""
    try:
        services.reservation_create(actor=Actor.for_user(user), tenant=tenant, gpu_model=MODELS[0][0], gpus=gpus,
                                    start=start, end=end, same_domain=same_domain)
        return "booked"
    except ServiceError:
        return "refused"
    except Exception:  # noqa: BLE001 - the figure to report is exactly "anything else"
        return "server_errors"


def _measure_busy_bookings(*, count: int, rng: random.Random) -> dict:
    """``count`` bookings, one at a time, of 1 to 16 nodes for 2-48 hours starting 1-20 days ahead,
    where the synthetic fleet is nearly full: latency as a tenant meets it, refusals included (most
    domains have no room, so a booking walks clusters in vain and falls back to the free-node count).
    """
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username=f"{PREFIX}-user")
    tenants = list(Tenant.objects.filter(slug__startswith=f"{PREFIX}-").order_by("slug"))
    step = policies.granularity()
    counts, elapsed = {"booked": 0, "refused": 0, "server_errors": 0}, []
    for index in range(count):
        start = policies.ceil_to_granularity(timezone.now() + step * rng.randint(4 * 24, 4 * 24 * 20))
        t0 = time.perf_counter()
        outcome = _book(user=user, tenant=tenants[index % len(tenants)], gpus=8 * rng.choice([1, 4, 8, 16]),
                        start=start, end=start + step * rng.randint(4 * 2, 4 * 48), same_domain=rng.random() < 0.5)
        elapsed.append((time.perf_counter() - t0) * 1000)
        counts[outcome] += 1
    if not elapsed:
        return {"bookings": 0} | counts
    return {"bookings": count} | counts | {"p50_ms": _percentile(elapsed, 50), "p95_ms": _percentile(elapsed, 95),
                                           "max_ms": round(max(elapsed), 2)}


CLIENT_MODELS = ("threads", "processes")
FLOOR_CLIENTS = (1, 16)
BOOKING_CLIENTS = (1, 4, 16)


def _in_threads(clients: int, work, warm_up) -> tuple[float, list]:
    """Run work(i) in ``clients`` threads of this process, each with its own connection; (seconds, results).

    Each client first calls warm_up(i) on its connection, before the clock starts (see _run_clients),
    and keeps it open until every client has finished (see _hang_up_together).
    """
    barrier = threading.Barrier(clients + 1)
    all_done = threading.Barrier(clients)
    results: list = [None] * clients
    errors: list = [None] * clients

    def body(index):
        try:
            warm_up(index)
            barrier.wait()
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller, which raises
            errors[index] = repr(exc)
            barrier.abort()  # or the others would wait for it at the start for ever
        finally:
            _hang_up_together(all_done)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed before the start: its error is raised below
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    _raise_client_failure(errors)
    return time.perf_counter() - t0, results


def _in_processes(clients: int, work, warm_up) -> tuple[float, list]:
    """Run work(i) in ``clients`` forked processes, each with its own connection; (seconds, results).

    Threads share one interpreter lock, so the Python half of each client's work runs one at a
    time; processes are how a web server runs the API (one worker process per request in flight).
    The clock stops when the last client finishes its work, not when the processes have exited.
    Each client keeps its connection until every client has finished (see _hang_up_together).
    """
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(clients + 1)
    all_done = context.Barrier(clients)
    queue = context.Queue()

    def body(index):
        try:
            warm_up(index)
            barrier.wait()
            result = work(index)
            queue.put((index, result, time.monotonic(), None))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises
            queue.put((index, None, time.monotonic(), repr(exc)))
            barrier.abort()  # or the others would wait for it at the start for ever
        finally:
            _hang_up_together(all_done)

    # Each child opens its own connection: none may inherit the parent's socket.
    connections.close_all()
    processes = [context.Process(target=body, args=(i,), daemon=True) for i in range(clients)]
    for process in processes:
        process.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed before the start: its error is raised below
    t0 = time.monotonic()
    reports = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    _raise_client_failure([error for *_, error in reports])
    results: list = [None] * clients
    for index, result, _, _ in reports:
        results[index] = result
    return max(finished for _, _, finished, _ in reports) - t0, results


def _raise_client_failure(errors: list) -> None:
    """Raise the first client error, if any (repr strings; None for a client that succeeded). The
    others that then found the start barrier broken failed because of it, so theirs come last."""
    failed = [error for error in errors if error]
    if failed:
        failed.sort(key=lambda error: error.startswith("BrokenBarrierError"))
        raise RuntimeError(f"benchmark client failed: {failed[0]}")


def _hang_up_together(all_done) -> None:
    """Close this client's connections once every client has finished its work.

    A client that closed as soon as it finished would end its server process while the others
    still run, on the same cores, inside their clock; the INSERT floor's clients all stop at one
    deadline, so theirs never do. Every client gets here (from a finally block), so the timeout
    only bounds the wait for a client stuck elsewhere.
    """
    try:
        all_done.wait(timeout=600)
    except threading.BrokenBarrierError:
        pass
    finally:
        connections.close_all()


def _run_clients(model: str, clients: int, work, warm_up) -> tuple[float, list]:
    """Run work(i) on ``clients`` connections as ``model``, timed from when every client has warmed up.

    Deployments keep their connections (DB_CONN_MAX_AGE), so a request meets a connection that has
    already connected, prepared the booking statements and filled its catalog caches; warm_up(i)
    brings each client's fresh connection to that state before the clock starts, so the figures
    measure the steady state and not 16 connections starting up.
    """
    def warm(index):
        connection.ensure_connection()
        warm_up(index)

    return (_in_processes if model == "processes" else _in_threads)(clients, work, warm)


def _insert_floor(*, clients: int, seconds: float, model: str = "threads") -> float:
    """Plain single-row INSERT transactions per second, ``clients`` connections as ``model``."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("CREATE TABLE IF NOT EXISTS bench_insert_floor (id bigserial PRIMARY KEY, "
                           "at timestamptz NOT NULL, payload text NOT NULL)")
        else:
            cursor.execute("CREATE TABLE IF NOT EXISTS bench_insert_floor (id integer PRIMARY KEY AUTOINCREMENT, "
                           "at text NOT NULL, payload text NOT NULL)")

    def insert():
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO bench_insert_floor (at, payload) VALUES (%s, %s)", [timezone.now(), "x"])

    def work(index):
        done = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            insert()
            done += 1
        return done

    elapsed, done = _run_clients(model, clients, work, warm_up=lambda index: insert())
    return round(sum(done) / elapsed, 1)


def _booking_week(run: int) -> timedelta:
    """How far ahead booking run ``run`` books: a week each from day 35 on, after the synthetic
    fleet's future bookings and, for the runs the command makes, within the booking lead time."""
    return timedelta(days=35 + 7 * run)


def _measure_bookings(*, clients: int, total: int, level: int, seed: int, model: str = "threads") -> dict:
    """``total`` bookings split over ``clients`` clients, all inside one 6-hour span (overlapping).

    Each client has made one booking (its warm-up, not counted) before the clock starts.
    """
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.get(username=f"{PREFIX}-user")
    tenants = list(Tenant.objects.filter(slug__startswith=f"{PREFIX}-").order_by("slug"))
    step = policies.granularity()
    base = policies.ceil_to_granularity(timezone.now() + _booking_week(level))

    def warm_up(index):
        # One booking of the client's own, days before the measured span, so it takes nothing from it.
        start = base - timedelta(days=3)
        services.reservation_create(actor=Actor.for_user(user), tenant=tenants[index % len(tenants)],
                                    gpu_model=MODELS[0][0], gpus=8, start=start, end=start + step * 8)

    def work(index):
        counts = {"booked": 0, "refused": 0, "server_errors": 0, "attempts": 0}
        rng = random.Random(seed * 1000 + level * 100 + index)
        tenant = tenants[index % len(tenants)]

        def count_attempts(execute, sql, params, many, context):
            # Each booking attempt starts with a statement that locks the tenant (PostgreSQL's path):
            # attempts beyond one per request are retries after losing a race for nodes, or bookings
            # the booking function left to the two-statement path.
            if sql.lstrip().startswith(ATTEMPT_MARKERS):
                counts["attempts"] += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(count_attempts):
            for _ in range(total // clients):
                start = base + step * rng.randint(0, 8)
                counts[_book(user=user, tenant=tenant, gpus=8 * rng.choice([1, 2, 4]), start=start,
                             end=start + step * rng.randint(8, 16), same_domain=True)] += 1
        return counts

    elapsed, results = _run_clients(model, clients, work, warm_up)
    totals = {key: sum(result[key] for result in results) for key in ("booked", "refused", "server_errors", "attempts")}
    requests = totals["booked"] + totals["refused"] + totals["server_errors"]
    attempts = totals.pop("attempts")
    return totals | {"seconds": round(elapsed, 2), "bookings_per_s": round(totals["booked"] / elapsed, 1),
                     "attempts_per_request": round(attempts / requests, 2) if attempts and requests else None}


# --- checks ---------------------------------------------------------------------------------------

def _double_bookings() -> int:
    """Non-cancelled allocations whose blocked period overlaps an earlier one on the same node."""
    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT count(*) FROM (
              SELECT starts_at, max(blocked_until) OVER (PARTITION BY node_id ORDER BY starts_at, id
                                                         ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end
              FROM reservations_allocation WHERE state <> 'cancelled') s
            WHERE prev_end > starts_at""")
        return cursor.fetchone()[0]


def _partial_bookings() -> int:
    """Holding reservations whose live allocations do not add up to the GPUs booked."""
    with connection.cursor() as cursor:
        cursor.execute("""
            SELECT count(*) FROM reservations_reservation r
            WHERE r.status IN ('pending', 'confirmed', 'provisioning', 'active', 'degraded', 'releasing')
              AND r.gpus <> COALESCE((SELECT sum(n.gpu_count) FROM reservations_allocation a
                                      JOIN inventory_node n ON n.id = a.node_id
                                      WHERE a.reservation_id = r.id AND a.state <> 'cancelled'), 0)""")
        return cursor.fetchone()[0]


def _targets(f: dict) -> dict:
    targets = {"search_p95_le_50ms": f["search"]["p95_ms"] <= 50,
               "zero_double_bookings": f["double_bookings"] == 0,
               "zero_partial_bookings": f["partial_bookings"] == 0,
               "zero_server_errors": f["server_errors"] == 0}
    if "p95_over_floor" in f["search"]:
        targets["search_p95_le_3x_floor"] = f["search"]["p95_over_floor"] <= 3
    for prefix, section in (("", f), ("processes_", f.get("processes", {}))):
        if "bookings" not in section:
            continue
        # Each round's 16-client booking rate over the floors measured in the same round (see _run).
        rates16 = section["bookings"]["16"]["runs_per_s"]
        for clients, floors in section["insert_floor_runs_tx_per_s"].items():
            ratios = [rate / floor for rate, floor in zip(rates16, floors) if floor]
            targets[f"{prefix}bookings16_over_insert_floor_{clients}_clients"] = (
                round(statistics.median(ratios), 3) if ratios else None)
    return targets
