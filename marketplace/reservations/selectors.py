"""Reads of the booking engine: free nodes, availability offers, the capacity calendar, reservations.

"Free" for a window [start, end) means: a bookable node (its model, status available, not
unhealthy, its cluster active) with no non-cancelled allocation whose blocked period
[starts_at, blocked_until) overlaps [start, end + cleaning gap), and no non-cancelled maintenance
window overlapping that padded period either. Padding the request (rather than only the existing
allocations) keeps the cleaning gap after *this* booking free as well.
"""

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.fields import RangeBoundary
from django.core.cache import cache
from django.db import connection
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.db.models import Count, Exists, OuterRef, Prefetch, Q, QuerySet
from django.utils import timezone

from marketplace.core.db import TsTzRange
from marketplace.core.exceptions import InvalidInput, NotFound
from marketplace.inventory.models import Cluster, GpuModel, GpuPrice, MaintenanceWindow, Node, Region
from marketplace.reservations import money, policies
from marketplace.reservations.models import Allocation, Reservation


log = logging.getLogger(__name__)


def cleaning_gap() -> timedelta:
    return settings.MARKETPLACE["CLEANING_GAP"]


# --- lookups of request parameters ---------------------------------------------------------------

def gpu_model_by_name(name: str) -> GpuModel:
    model = GpuModel.objects.filter(name=name).first() if name else None
    if model is None:
        known = ", ".join(GpuModel.objects.order_by("name").values_list("name", flat=True)[:20])
        raise InvalidInput(f"No GPU model named {name!r}. Known models: {known or 'none'}.",
                           code="unknown_gpu_model", fields={"gpu_model": ["unknown GPU model"]})
    return model


def region_by_code(code: str | None) -> Region | None:
    if not code:
        return None
    region = Region.objects.filter(code=code).first()
    if region is None:
        raise InvalidInput(f"No region {code!r}.", code="unknown_region", fields={"region": ["unknown region"]})
    return region


# --- free nodes -----------------------------------------------------------------------------------

def bookable_nodes(*, gpu_model: GpuModel, region: Region | None = None,
                   cluster_ids: list[int] | None = None) -> QuerySet[Node]:
    """Nodes that may be offered at all: maintenance, offline, retired, unhealthy never are.

    The active clusters (or ``cluster_ids``, already known to be active) are passed as a list:
    joining the tiny cluster table makes the planner guess "few nodes" and probe every node's
    allocations one by one, where one scan of the window's allocations is four times faster.
    """
    return _bookable_nodes_of(models=[gpu_model],
                              cluster_ids=active_cluster_ids(region) if cluster_ids is None else cluster_ids)


def active_cluster_ids(region: Region | None = None) -> list[int]:
    clusters = Cluster.objects.filter(status=Cluster.Status.ACTIVE)
    if region is not None:
        clusters = clusters.filter(region=region)
    return list(clusters.values_list("pk", flat=True))


def _bookable_nodes_of(*, models: list[GpuModel], cluster_ids: list[int]) -> QuerySet[Node]:
    return Node.objects.filter(gpu_model__in=models, status=Node.Status.AVAILABLE,
                               cluster_id__in=cluster_ids).exclude(health=Node.Health.UNHEALTHY)


def allocations_overlapping(*, start: datetime, end: datetime) -> QuerySet[Allocation]:
    """Non-cancelled allocations whose blocked period overlaps [start, end).

    On PostgreSQL the test is also written as a range overlap on exactly the expression and
    predicate of the GiST indexes, so the planner can scan the window once instead of walking
    every node's allocation history.
    """
    live = Allocation.objects.exclude(state=Allocation.State.CANCELLED)
    overlapping = live.filter(starts_at__lt=end, blocked_until__gt=start)
    if connection.vendor == "postgresql":
        # Both forms of the same test: the range overlap lets a fleet-wide search use the covering
        # GiST index; the plain comparisons let a one-node probe use allocation_node_busy_idx.
        return overlapping.annotate(period=TsTzRange("starts_at", "blocked_until", RangeBoundary())).filter(
            period__overlap=DateTimeTZRange(start, end, "[)"))
    return overlapping


def maintenance_overlapping(*, start: datetime, end: datetime) -> QuerySet[MaintenanceWindow]:
    return MaintenanceWindow.objects.filter(cancelled_at__isnull=True, starts_at__lt=end, ends_at__gt=start)


def free_nodes(*, gpu_model: GpuModel, start: datetime, end: datetime, region: Region | None = None,
               cluster_ids: list[int] | None = None, ignore_reservation: Reservation | None = None) -> QuerySet[Node]:
    """Bookable nodes free for [start, end) plus the cleaning gap after it."""
    padded_end = end + cleaning_gap()
    busy = allocations_overlapping(start=start, end=padded_end).filter(node_id=OuterRef("pk"))
    if ignore_reservation is not None:
        busy = busy.exclude(reservation=ignore_reservation)
    maintenance = maintenance_overlapping(start=start, end=padded_end).filter(node_id=OuterRef("pk"))
    return bookable_nodes(gpu_model=gpu_model, region=region, cluster_ids=cluster_ids).filter(
        ~Exists(busy), ~Exists(maintenance))


@dataclass(frozen=True)
class PricedCluster:
    """An active cluster where a GPU model has a price: what an offer needs of both."""
    cluster_id: int
    name: str
    region_code: str
    unit_price: Decimal
    currency: str


def priced_clusters(*, gpu_model: GpuModel, region: Region | None = None) -> list[PricedCluster]:
    """Active clusters where ``gpu_model`` has a price, cheapest first (then by name).

    One query of plain values, written out on PostgreSQL (numeric comes back as Decimal with its
    scale, as from the ORM): as two queries of model instances (prices, then clusters with their
    regions) it cost 3.8 ms, as one ORM query 2.9 ms, written out 0.6 ms, in a 40 ms search.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_PRICED_CLUSTERS_SQL, {"model": gpu_model.pk, "active": Cluster.Status.ACTIVE.value,
                                                  "region": region.pk if region is not None else None})
            rows = cursor.fetchall()
    else:
        prices = GpuPrice.objects.filter(gpu_model=gpu_model, region__clusters__status=Cluster.Status.ACTIVE)
        if region is not None:
            prices = prices.filter(region=region)
        rows = prices.values_list("region__clusters__id", "region__clusters__name", "region__code",
                                  "price_per_gpu_hour", "currency")
    return sorted((PricedCluster(*row) for row in rows),
                  key=lambda cluster: (*price_order(cluster.currency, cluster.unit_price), cluster.name))


def price_order(currency: str, amount: Decimal) -> tuple:
    """How prices rank: the marketplace's own currency (MARKETPLACE_DEFAULT_CURRENCY) first, then
    other currencies by code, each cheapest first. Amounts in different currencies are never
    compared: 2.40 EUR is not cheaper than 2.50 USD for want of an exchange rate."""
    return currency != settings.MARKETPLACE["DEFAULT_CURRENCY"], currency, amount


_PRICED_CLUSTERS_SQL = """
SELECT c.id, c.name, r.code, p.price_per_gpu_hour, p.currency
FROM inventory_gpuprice p
JOIN inventory_region r ON r.id = p.region_id
JOIN inventory_cluster c ON c.region_id = p.region_id
WHERE p.gpu_model_id = %(model)s AND c.status = %(active)s AND (%(region)s::bigint IS NULL OR p.region_id = %(region)s)
"""


# free_nodes() grouped by domain, written out for PostgreSQL: building the same query with the ORM
# (two correlated Exists, one over an annotated range) costs 6-9 ms of Python per search on the
# 2-core development machine, a sixth of running it. The window test is both the plain comparisons
# and the range overlap, as in allocations_overlapping(); the states are literals so that the
# partial indexes' predicates match.
FREE_NODE_COUNTS_SQL = """
SELECT n.cluster_id, n.topology_domain, count(*)
FROM inventory_node n
WHERE n.gpu_model_id = %(model)s AND n.status = '{available}' AND n.health <> '{unhealthy}'
  AND n.cluster_id = ANY(%(clusters)s)
  AND NOT EXISTS (SELECT 1 FROM reservations_allocation a
                  WHERE a.node_id = n.id AND a.state <> '{cancelled}'
                    AND a.starts_at < %(padded_end)s AND a.blocked_until > %(start)s
                    AND tstzrange(a.starts_at, a.blocked_until, '[)') && tstzrange(%(start)s, %(padded_end)s, '[)'))
  AND NOT EXISTS (SELECT 1 FROM inventory_maintenancewindow m
                  WHERE m.node_id = n.id AND m.cancelled_at IS NULL AND m.starts_at < %(padded_end)s
                    AND m.ends_at > %(start)s)
GROUP BY n.cluster_id, n.topology_domain
""".replace("{available}", Node.Status.AVAILABLE.value).replace("{unhealthy}", Node.Health.UNHEALTHY.value).replace(
    "{cancelled}", Allocation.State.CANCELLED.value)


def free_node_counts(*, gpu_model: GpuModel, start: datetime, end: datetime,
                     cluster_ids: list[int]) -> dict[int, dict[str, int]]:
    """{cluster id: {topology domain: free nodes}}: one grouped query."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(FREE_NODE_COUNTS_SQL, {"model": gpu_model.pk, "clusters": list(cluster_ids),
                                                  "start": start, "padded_end": end + cleaning_gap()})
            rows = cursor.fetchall()
    else:
        rows = (free_nodes(gpu_model=gpu_model, start=start, end=end, cluster_ids=cluster_ids)
                .order_by().values_list("cluster_id", "topology_domain").annotate(n=Count("id")))
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for cluster_id, domain, n in rows:
        counts[cluster_id][domain] = n
    return counts


# --- offers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    region: str
    cluster: str
    cluster_id: int
    nodes: int
    gpus: int
    same_domain: bool
    domains: tuple[str, ...]
    unit_price: Decimal
    total_price: Decimal
    currency: str
    start: datetime
    end: datetime

    @classmethod
    def in_cluster(cls, *, cluster: "PricedCluster", nodes: int, gpus: int, domains: tuple[str, ...],
                   start: datetime, end: datetime) -> "Offer":
        """The offer of ``nodes`` nodes (``gpus`` GPUs) in ``domains`` of ``cluster`` for [start, end), priced."""
        return cls(region=cluster.region_code, cluster=cluster.name, cluster_id=cluster.cluster_id, nodes=nodes,
                   gpus=gpus, same_domain=len(domains) == 1, domains=domains, unit_price=cluster.unit_price,
                   total_price=money.reservation_total(unit_price=cluster.unit_price, gpus=gpus, duration=end - start),
                   currency=cluster.currency, start=start, end=end)


@dataclass
class Availability:
    gpu_model: str
    gpus: int
    nodes: int
    start: datetime
    end: datetime
    offers: list[Offer] = field(default_factory=list)
    reason: dict | None = None  # {"code", "message"} when no offer fits


def plan_domains(domain_counts: dict[str, int], nodes: int, *, same_domain: bool) -> tuple[str, ...] | None:
    """Which topology domains to take ``nodes`` free nodes from, or None if they do not fit.

    Prefers one domain: the first by name that fits, which is the one a booking takes (it walks
    domains in that order and stops at the first fit); otherwise the fewest domains, largest first.
    """
    fitting = sorted(d for d, n in domain_counts.items() if n >= nodes)
    if fitting:
        return (fitting[0],)
    if same_domain or sum(domain_counts.values()) < nodes:
        return None
    chosen, total = [], 0
    for domain, n in sorted(domain_counts.items(), key=lambda item: (-item[1], item[0])):
        chosen.append(domain)
        total += n
        if total >= nodes:
            return tuple(chosen)
    return None


def offers_for(*, gpu_model: GpuModel, nodes: int, start: datetime, end: datetime,
               counts: dict[int, dict[str, int]], priced: list[PricedCluster],
               same_domain: bool) -> list[Offer]:
    """Feasible offers, best first: one domain before several, then cheaper (price_order), then by cluster name."""
    offers = []
    gpus = nodes * gpu_model.gpus_per_node
    for cluster in priced:
        domains = plan_domains(counts.get(cluster.cluster_id, {}), nodes, same_domain=same_domain)
        if domains is None:
            continue
        offers.append(Offer.in_cluster(cluster=cluster, nodes=nodes, gpus=gpus, domains=domains, start=start, end=end))
    offers.sort(key=lambda o: (not o.same_domain, *price_order(o.currency, o.total_price), o.cluster))
    return offers


def _no_offer_reason(*, gpu_model: GpuModel, nodes: int, region: Region | None, same_domain: bool,
                     counts: dict[int, dict[str, int]], cluster_ids: list[int]) -> dict:
    where = f" in region {region.code}" if region else ""
    if not counts and not bookable_nodes(gpu_model=gpu_model, cluster_ids=cluster_ids).exists():
        return {"code": "no_nodes", "message": f"There are no bookable {gpu_model.name} nodes with a price{where}."}
    best_cluster = max((sum(c.values()) for c in counts.values()), default=0)
    best_domain = max((n for c in counts.values() for n in c.values()), default=0)
    size = gpu_model.gpus_per_node
    # A node idle in the window itself may still be taken by what starts within the gap after it.
    window = f"in that window and the {_minutes(cleaning_gap())} cleaning gap after it"
    if same_domain and best_cluster >= nodes:
        return {"code": "insufficient_capacity",
                "message": f"Only {best_domain} free {gpu_model.name} nodes ({best_domain * size} GPUs) share one "
                           f"topology domain{where} {window}; you asked for {nodes} ({nodes * size} GPUs)."}
    return {"code": "insufficient_capacity",
            "message": f"Only {best_cluster} free {gpu_model.name} nodes ({best_cluster * size} GPUs) in one "
                       f"cluster{where} {window}; you asked for {nodes} ({nodes * size} GPUs)."}


def _minutes(span: timedelta) -> str:
    minutes = int(span.total_seconds() // 60)
    return f"{minutes}-minute" if minutes < 120 or minutes % 60 else f"{minutes // 60}-hour"


def availability_search(*, gpu_model: GpuModel, gpus: int, start: datetime, end: datetime,
                        region: Region | None = None, same_domain: bool = False) -> Availability:
    """Offers for ``gpus`` of ``gpu_model`` over [start, end). Window policies are checked by the caller."""
    nodes = policies.check_gpus(gpus=gpus, gpus_per_node=gpu_model.gpus_per_node, model_name=gpu_model.name)
    # Only clusters where the model has a price can be offered; counting just those nodes.
    priced = priced_clusters(gpu_model=gpu_model, region=region)
    cluster_ids = [cluster.cluster_id for cluster in priced]
    counts = free_node_counts(gpu_model=gpu_model, start=start, end=end, cluster_ids=cluster_ids)
    result = Availability(gpu_model=gpu_model.name, gpus=gpus, nodes=nodes, start=start, end=end)
    result.offers = offers_for(gpu_model=gpu_model, nodes=nodes, start=start, end=end, counts=counts,
                               priced=priced, same_domain=same_domain)
    if not result.offers:
        result.reason = _no_offer_reason(gpu_model=gpu_model, nodes=nodes, region=region,
                                         same_domain=same_domain, counts=counts, cluster_ids=cluster_ids)
    return result


# A fortnight of a full fleet is 10^5 busy periods; as timestamps through the ORM they take seconds
# to load, as epoch seconds (float8) a tenth of that.
_BUSY_PERIODS_SQL = """
SELECT a.node_id, extract(epoch FROM a.starts_at)::float8, extract(epoch FROM a.blocked_until)::float8
FROM reservations_allocation a JOIN inventory_node n ON n.id = a.node_id
WHERE n.gpu_model_id = ANY(%(models)s) AND n.cluster_id = ANY(%(clusters)s) AND a.state <> '{cancelled}'
  AND a.starts_at < %(end)s AND a.blocked_until > %(start)s
  AND tstzrange(a.starts_at, a.blocked_until, '[)') && tstzrange(%(start)s, %(end)s, '[)')
UNION ALL
SELECT m.node_id, extract(epoch FROM m.starts_at)::float8, extract(epoch FROM m.ends_at)::float8
FROM inventory_maintenancewindow m JOIN inventory_node n ON n.id = m.node_id
WHERE n.gpu_model_id = ANY(%(models)s) AND n.cluster_id = ANY(%(clusters)s) AND m.cancelled_at IS NULL
  AND m.starts_at < %(end)s AND m.ends_at > %(start)s
""".replace("{cancelled}", Allocation.State.CANCELLED.value)


def _busy_periods(*, model_ids: list[int], cluster_ids: list[int], start: datetime,
                  end: datetime) -> list[tuple[int, float, float]]:
    """(node id, from, until) in epoch seconds: every live allocation's blocked period and maintenance
    window overlapping [start, end) on the nodes of these models in these clusters."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_BUSY_PERIODS_SQL, {"models": list(model_ids), "clusters": list(cluster_ids),
                                               "start": start, "end": end})
            return cursor.fetchall()
    of_these_nodes = {"node__gpu_model_id__in": model_ids, "node__cluster_id__in": cluster_ids}
    periods = [*allocations_overlapping(start=start, end=end).filter(**of_these_nodes)
               .values_list("node_id", "starts_at", "blocked_until"),
               *maintenance_overlapping(start=start, end=end).filter(**of_these_nodes)
               .values_list("node_id", "starts_at", "ends_at")]
    return [(node_id, since.timestamp(), until.timestamp()) for node_id, since, until in periods]


def _fitting_starts(*, gpu_model: GpuModel, nodes: int, duration: timedelta, after: datetime, until: datetime,
                    cluster_ids: list[int], same_domain: bool) -> list[datetime]:
    """Aligned starts in (after, until], earliest first, at which ``nodes`` bookable nodes of one
    cluster (of one topology domain with ``same_domain``) are free for the whole window: for each
    cluster or domain, the first such start.

    A node cannot start a window at t while one of its busy periods (an allocation's blocked
    period, a maintenance window) overlaps [t, t + duration + cleaning gap): that is, for t strictly
    between the period's start minus the padded duration and its end. Every node's remaining starts
    on the booking grid become +1/-1 edges of its group, and one sweep over time finds where a group
    first holds enough nodes: two queries over the horizon instead of a search per candidate start.
    Inside, times are whole grid steps since the epoch.
    """
    step = int(policies.granularity().total_seconds())
    padded = (duration + cleaning_gap()).total_seconds()

    # Grid steps: the first strictly after a moment is int(t // step) + 1; the last strictly before
    # it is -int(-t // step) - 1 (t in epoch seconds). Written inline below: this runs 10^5 times.
    first, last = int(after.timestamp() // step) + 1, int(until.timestamp() // step)
    if first > last:
        return []
    group_of = {node_id: (cluster_id, domain) if same_domain else cluster_id
                for node_id, cluster_id, domain in bookable_nodes(gpu_model=gpu_model, cluster_ids=cluster_ids)
                .values_list("pk", "cluster_id", "topology_domain")}
    blocked: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for node_id, busy_from, busy_until in _busy_periods(
            model_ids=[gpu_model.pk], cluster_ids=cluster_ids, start=datetime.fromtimestamp(first * step, UTC),
            end=datetime.fromtimestamp(last * step + padded, UTC)):
        low, high = int((busy_from - padded) // step) + 1, -int(-busy_until // step) - 1
        if low <= high and node_id in group_of:
            blocked[node_id].append((low, high))
    edges: list[tuple[int, int, object]] = []
    for node_id, group in group_of.items():
        free_from = first
        for low, high in sorted(blocked.get(node_id, ())):
            if free_from > last:
                break
            if low > free_from:
                edges += [(free_from, 1, group), (min(low, last + 1), -1, group)]
            if high >= free_from:
                free_from = high + 1
        if free_from <= last:
            edges += [(free_from, 1, group), (last + 1, -1, group)]
    edges.sort()  # by moment, and at one moment nodes leave (-1) before others join (+1)
    free: dict[object, int] = defaultdict(int)
    fits: dict[object, int] = {}
    for moment, change, group in edges:
        free[group] += change
        if change > 0 and group not in fits and free[group] >= nodes:
            fits[group] = moment
    return [datetime.fromtimestamp(moment * step, UTC) for moment in sorted(set(fits.values()))]


EARLIEST_MAX_PROBES = 200


def availability_earliest(*, gpu_model: GpuModel, gpus: int, start: datetime, end: datetime,
                          horizon: datetime, region: Region | None = None,
                          same_domain: bool = False) -> Availability:
    """The first window of the same length, starting in [start, horizon], for which offers exist."""
    duration = end - start
    first = availability_search(gpu_model=gpu_model, gpus=gpus, start=start, end=end, region=region,
                                same_domain=same_domain)
    if first.offers:
        return first
    cluster_ids = [cluster.cluster_id for cluster in priced_clusters(gpu_model=gpu_model, region=region)]
    # Each start the sweep finds is confirmed by the search itself, which prices it.
    for moment in _fitting_starts(gpu_model=gpu_model, nodes=first.nodes, duration=duration, after=start,
                                  until=horizon, cluster_ids=cluster_ids, same_domain=same_domain)[:EARLIEST_MAX_PROBES]:
        found = availability_search(gpu_model=gpu_model, gpus=gpus, start=moment, end=moment + duration,
                                    region=region, same_domain=same_domain)
        if found.offers:
            return found
    first.reason = {"code": "insufficient_capacity",
                    "message": f"No window of {duration} starting before {horizon:%Y-%m-%d %H:%M} UTC fits "
                               f"{gpus} {gpu_model.name} GPUs{' in one topology domain' if same_domain else ''}."}
    return first


# --- capacity calendar --------------------------------------------------------------------------

@dataclass(frozen=True)
class CapacityBucket:
    start: datetime
    end: datetime
    total_gpus: int
    free_gpus: int


def capacity_timeline(*, start: datetime, end: datetime, step: timedelta, gpu_model: GpuModel | None = None,
                      region: Region | None = None) -> dict[str, list[CapacityBucket]]:
    """Per GPU model: GPUs on bookable nodes free for each whole bucket [t, t + step) of [start, end).

    Free as the search counts it: a booking of the bucket could take the node, so the cleaning gap
    after the bucket must be free too, and only nodes in clusters where the model has a price count.

    Three queries (priced clusters, their nodes, the nodes' busy periods in the range as epoch
    seconds). Each node's busy periods become merged runs of buckets; each run takes the node's GPUs
    off its model's free count from its first bucket to its last, by a difference array: the work
    grows with the periods, not with periods times buckets (a fortnight in hours over the full fleet
    took 7 s that way).
    """
    if step <= timedelta(0):
        raise InvalidInput("step must be positive.", fields={"step": ["must be positive"]})
    buckets = int(-(-(end - start) // step))
    if buckets > settings.MARKETPLACE["CAPACITY_MAX_BUCKETS"]:
        raise InvalidInput(f"That is {buckets} buckets; at most {settings.MARKETPLACE['CAPACITY_MAX_BUCKETS']} "
                           f"per request: use a larger step or a shorter range.", fields={"step": ["too small"]})
    models = [gpu_model] if gpu_model else list(GpuModel.objects.order_by("name"))
    priced = {model.pk: {cluster.cluster_id for cluster in priced_clusters(gpu_model=model, region=region)}
              for model in models}
    cluster_ids = sorted(set().union(*priced.values()))
    nodes = {pk: (model_id, gpu_count) for pk, model_id, cluster_id, gpu_count in
             _bookable_nodes_of(models=models, cluster_ids=cluster_ids)
             .values_list("pk", "gpu_model_id", "cluster_id", "gpu_count") if cluster_id in priced[model_id]}
    origin, width, gap = start.timestamp(), step.total_seconds(), cleaning_gap().total_seconds()
    runs: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for node_id, busy_from, busy_until in _busy_periods(model_ids=[model.pk for model in models],
                                                        cluster_ids=cluster_ids, start=start, end=end + cleaning_gap()):
        if node_id in nodes:
            # Buckets [first, last] whose booking, cleaning gap included, overlaps [busy_from,
            # busy_until): the first is the one whose padded end passes busy_from; the last is the one
            # before the bucket that starts at or after busy_until.
            first = max(0, int((busy_from - gap - origin) // width))
            last = min(buckets - 1, -int(-(busy_until - origin) // width) - 1)
            runs[node_id].append((first, last))
    taken: dict[int, list[int]] = {model.pk: [0] * (buckets + 1) for model in models}
    for node_id, node_runs in runs.items():
        model_id, gpu_count = nodes[node_id]
        changes = taken[model_id]
        run_first, run_last = None, None
        for first, last in sorted(node_runs) + [(buckets + 1, buckets + 1)]:
            if run_last is not None and first <= run_last + 1:
                run_last = max(run_last, last)  # overlapping or adjacent: one run
                continue
            if run_last is not None:
                changes[run_first] += gpu_count
                changes[run_last + 1] -= gpu_count
            run_first, run_last = first, last
    totals: dict[int, int] = defaultdict(int)
    for model_id, gpu_count in nodes.values():
        totals[model_id] += gpu_count
    result: dict[str, list[CapacityBucket]] = {}
    for model in models:
        series, held = [], 0
        for index in range(buckets):
            held += taken[model.pk][index]
            bucket_start = start + index * step
            series.append(CapacityBucket(start=bucket_start, end=min(bucket_start + step, end),
                                         total_gpus=totals[model.pk], free_gpus=totals[model.pk] - held))
        result[model.name] = series
    return result


@dataclass(frozen=True)
class CapacityCalendar:
    as_of: datetime  # when the counts were computed
    models: dict[str, list[CapacityBucket]]


def capacity_calendar(*, start: datetime, end: datetime, step: timedelta, gpu_model: GpuModel | None = None,
                      region: Region | None = None, fresh: bool = False) -> CapacityCalendar:
    """capacity_timeline(), kept in the cache for CAPACITY_CACHE_TTL: the booking page shows it on every
    visit and API clients poll it, and it holds no tenant's data, so every caller may share it.
    ``fresh`` counts again (and shares the new count), for a caller who has just changed capacity."""
    ttl = settings.MARKETPLACE["CAPACITY_CACHE_TTL"].total_seconds()
    key = (f"capacity-calendar:{start.timestamp()}:{end.timestamp()}:{step.total_seconds()}:"
           f"{gpu_model.pk if gpu_model else '*'}:{region.pk if region else '*'}")
    shared = ttl > 0
    try:
        cached = cache.get(key) if shared and not fresh else None
    except Exception:  # noqa: BLE001 - an unreachable cache costs a recount, never the page
        log.warning("capacity calendar: the cache is unavailable; counting without it", exc_info=True)
        cached, shared = None, False
    if cached is not None:
        return cached
    calendar = CapacityCalendar(as_of=timezone.now(), models=capacity_timeline(
        start=start, end=end, step=step, gpu_model=gpu_model, region=region))
    if shared:
        try:
            cache.set(key, calendar, ttl)
        except Exception:  # noqa: BLE001 - as above
            log.warning("capacity calendar: the cache is unavailable; not shared", exc_info=True)
    return calendar


# --- reservations -------------------------------------------------------------------------------

def reservation_list(*, tenant, status: list[str] | None = None, start: datetime | None = None,
                     end: datetime | None = None) -> QuerySet[Reservation]:
    """A tenant's reservations, optionally by status and overlapping [start, end); no N+1."""
    reservations = (
        Reservation.objects.for_tenant(tenant)
        .select_related("cluster__region", "gpu_model")
        .prefetch_related(Prefetch("allocations", queryset=Allocation.objects.select_related("node")
                                   .order_by("node__name")))
        .order_by("-starts_at", "-created_at")
    )
    if status:
        reservations = reservations.filter(status__in=status)
    if start is not None:
        reservations = reservations.filter(ends_at__gt=start)
    if end is not None:
        reservations = reservations.filter(starts_at__lt=end)
    return reservations


def reservation_get(*, tenant, reservation_id) -> Reservation:
    reservation = reservation_list(tenant=tenant).filter(pk=reservation_id).first()
    if reservation is None:
        raise NotFound("No such reservation.")
    return reservation


def reservation_node_names(reservation: Reservation) -> list[str]:
    """Nodes the reservation holds (or held); a cancelled one shows the nodes it had booked."""
    allocations = list(reservation.allocations.all())
    shown = [a for a in allocations if a.state in (Allocation.State.ACTIVE, Allocation.State.RELEASED)]
    if not shown and reservation.status == Reservation.Status.CANCELLED:
        shown = allocations
    return sorted({a.node.name for a in shown})
