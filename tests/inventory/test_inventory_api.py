"""Ops manage the inventory through the API; tenants only read the catalogue."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.core.models import AuditLog
from marketplace.inventory.models import Cluster, GpuPrice, MaintenanceWindow, Node
from tests.factories import (
    AllocationFactory, ClusterFactory, GpuModelFactory, GpuPriceFactory, NodeFactory, RegionFactory,
)


@pytest.fixture
def ops(api_client_for, staff_user):
    return api_client_for(staff_user)


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"code", "message", "fields"} and error["message"]
    return error


def iso(moment) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.django_db
class TestCatalogueForTenants:
    def test_tenant_reads_regions_and_gpu_models_with_prices(self, api):
        # given a priced model
        price = GpuPriceFactory()
        # when a tenant reads the catalogue
        regions = api.get("/api/v1/regions/").json()["results"]
        models = api.get("/api/v1/gpu-models/").json()["results"]
        # then it sees the region and the model's price there
        assert [r["code"] for r in regions] == [price.region.code]
        assert models[0]["name"] == price.gpu_model.name
        assert models[0]["prices"] == [{"region": price.region.code, "currency": "USD",
                                        "price_per_gpu_hour": str(price.price_per_gpu_hour)}]

    @pytest.mark.parametrize("path", ["/api/v1/clusters/", "/api/v1/nodes/", "/api/v1/maintenance-windows/"])
    def test_tenant_cannot_see_ops_inventory(self, api, path):
        assert_error(api.get(path), 403)

    @pytest.mark.parametrize("path,body", [
        ("/api/v1/gpu-prices/", {"gpu_model": "H100-SXM-80GB", "region": "us-east", "price_per_gpu_hour": "1"}),
        ("/api/v1/clusters/", {"name": "c1", "region": "us-east"}),
        ("/api/v1/nodes/bulk-status/", {"node_ids": [1], "status": "offline"}),
    ])
    def test_tenant_cannot_write_inventory(self, api, path, body):
        GpuPriceFactory()
        assert_error(api.post(path, body, format="json"), 403)
        assert not AuditLog.objects.filter(action__startswith="cluster.").exists()

    def test_catalogue_list_is_a_fixed_number_of_queries(self, api, django_assert_max_num_queries):
        for name in ["H100-SXM-80GB", "A100-SXM-80GB", "L40S-48GB"]:
            GpuPriceFactory(gpu_model=GpuModelFactory(name=name))
        with django_assert_max_num_queries(6):
            assert len(api.get("/api/v1/gpu-models/").json()["results"]) == 3


@pytest.mark.django_db
class TestClusters:
    def test_ops_create_and_update_a_cluster_with_audit(self, ops):
        region = RegionFactory()
        created = ops.post("/api/v1/clusters/", {"name": "use-zeta", "region": region.code}, format="json")
        assert created.status_code == 201, created.content
        updated = ops.patch("/api/v1/clusters/use-zeta/", {"status": "disabled"}, format="json")
        assert updated.json()["status"] == "disabled"
        actions = list(AuditLog.objects.filter(object_type="inventory.cluster").values_list("action", flat=True))
        assert sorted(actions) == ["cluster.create", "cluster.update"]

    @pytest.mark.parametrize("body,field", [
        ({"region": "us-east"}, "name"),
        ({"name": "Not A Slug!", "region": "us-east"}, "name"),
        ({"name": "c2", "region": "nowhere"}, "region"),
        ({"name": "c2", "region": "us-east", "connection": "kubeconfig"}, "__all__"),
        ({"name": "c2", "region": "us-east", "connection": "telepathy"}, "connection"),
    ])
    def test_bad_cluster_input_is_400_and_writes_nothing(self, ops, body, field):
        RegionFactory()
        error = assert_error(ops.post("/api/v1/clusters/", body, format="json"), 400)
        assert field in error["fields"]
        assert not Cluster.objects.exists() and not AuditLog.objects.exists()

    def test_duplicate_cluster_name_is_400(self, ops):
        cluster = ClusterFactory()
        error = assert_error(ops.post("/api/v1/clusters/", {"name": cluster.name, "region": "us-east"},
                                      format="json"), 400)
        assert "name" in error["fields"]

    def test_bad_cluster_update_is_400_and_changes_nothing(self, ops):
        cluster = ClusterFactory()
        assert_error(ops.patch(f"/api/v1/clusters/{cluster.name}/", {"status": "melted"}, format="json"), 400)
        assert_error(ops.patch(f"/api/v1/clusters/{cluster.name}/", {"connection": "kubeconfig"}, format="json"), 400)
        cluster.refresh_from_db()
        assert (cluster.status, cluster.connection) == ("active", "plan")


@pytest.mark.django_db
class TestNodes:
    def test_ops_create_and_update_a_node(self, ops):
        cluster, model = ClusterFactory(), GpuModelFactory()
        body = {"name": "n-001", "cluster": cluster.name, "gpu_model": model.name, "topology_domain": "ib-3"}
        created = ops.post("/api/v1/nodes/", body, format="json")
        assert created.status_code == 201, created.content
        assert created.json()["gpu_count"] == 8
        node_id = created.json()["id"]
        updated = ops.patch(f"/api/v1/nodes/{node_id}/", {"topology_domain": "ib-4"}, format="json")
        assert updated.json()["topology_domain"] == "ib-4"
        row = AuditLog.objects.get(action="node.update")
        assert (row.before["topology_domain"], row.after["topology_domain"]) == ("ib-3", "ib-4")

    @pytest.mark.parametrize("change,field", [
        ({"gpu_count": 0}, "__all__"), ({"topology_domain": ""}, "topology_domain"), ({"cpu_cores": -1}, "cpu_cores"),
    ])
    def test_bad_node_update_is_400(self, ops, change, field):
        node = NodeFactory()
        error = assert_error(ops.patch(f"/api/v1/nodes/{node.pk}/", change, format="json"), 400)
        assert field in error["fields"]
        assert not AuditLog.objects.exists()

    def test_duplicate_node_in_a_cluster_is_400_with_the_constraint_message(self, ops):
        node = NodeFactory()
        body = {"name": node.name, "cluster": node.cluster.name, "gpu_model": node.gpu_model.name,
                "topology_domain": "ib-0"}
        error = assert_error(ops.post("/api/v1/nodes/", body, format="json"), 400)
        assert "A node with this name already exists in this cluster." in error["message"]
        assert Node.objects.count() == 1

    @pytest.mark.parametrize("body", [
        {}, {"name": "n", "cluster": "nope", "gpu_model": "H100-SXM-80GB", "topology_domain": "x"},
        {"name": "n", "cluster": "c", "gpu_model": "H100-SXM-80GB", "topology_domain": "x", "gpu_count": 0},
        # PostgreSQL refuses NUL even in the lookup of the related row.
        {"name": "n", "cluster": "c", "gpu_model": "H100\x00", "topology_domain": "x"},
    ])
    def test_bad_node_input_is_400(self, ops, body):
        ClusterFactory(name="c")
        GpuModelFactory()
        assert_error(ops.post("/api/v1/nodes/", body, format="json"), 400)
        assert not Node.objects.exists()

    def test_a_filter_with_a_nul_character_is_400(self, ops):
        NodeFactory()
        error = assert_error(ops.get("/api/v1/nodes/", {"cluster__name": "east\x00"}), 400)
        assert "NUL" in error["message"]

    def test_node_list_is_filtered_and_a_fixed_number_of_queries(self, ops, django_assert_max_num_queries):
        NodeFactory.create_batch(5)
        NodeFactory.create_batch(3, status=Node.Status.MAINTENANCE)
        with django_assert_max_num_queries(4):
            rows = ops.get("/api/v1/nodes/", {"status": "maintenance"}).json()["results"]
        assert {row["status"] for row in rows} == {"maintenance"} and len(rows) == 3


@pytest.mark.django_db
class TestBulkStatus:
    def test_idle_nodes_go_to_maintenance_all_audited(self, ops):
        nodes = NodeFactory.create_batch(3)
        response = ops.post("/api/v1/nodes/bulk-status/",
                            {"node_ids": [n.pk for n in nodes], "status": "maintenance", "reason": "firmware"},
                            format="json")
        assert response.status_code == 200, response.content
        assert {row["status"] for row in response.json()["nodes"]} == {"maintenance"}
        assert response.json()["affected_allocations"] == []
        assert AuditLog.objects.filter(action="node.status", message="firmware").count() == 3

    def test_booked_node_is_refused_with_every_booking_named_and_nothing_changes(self, ops):
        # given one free node and one booked tomorrow
        free = NodeFactory()
        allocation = AllocationFactory(node=NodeFactory())
        booked = allocation.node
        # when ops take both into maintenance without force
        response = ops.post("/api/v1/nodes/bulk-status/", {"node_ids": [free.pk, booked.pk], "status": "maintenance"},
                            format="json")
        # then the whole change is refused, naming the booked node, its tenant and reservation
        error = assert_error(response, 409)
        assert error["code"] == "node_has_allocations"
        [detail] = error["fields"]["node_ids"]
        assert booked.name in detail and allocation.reservation.tenant.slug in detail
        assert str(allocation.reservation_id) in detail
        assert set(Node.objects.values_list("status", flat=True)) == {"available"}
        assert not AuditLog.objects.filter(action="node.status").exists()

    def test_force_applies_and_reports_the_affected_bookings(self, ops):
        allocation = AllocationFactory()
        response = ops.post("/api/v1/nodes/bulk-status/",
                            {"node_ids": [allocation.node_id], "status": "offline", "force": True}, format="json")
        assert response.status_code == 200
        [affected] = response.json()["affected_allocations"]
        assert affected["reservation_id"] == str(allocation.reservation_id)
        assert Node.objects.get(pk=allocation.node_id).status == "offline"

    def test_past_bookings_do_not_block(self, ops):
        allocation = AllocationFactory(
            reservation__starts_at=timezone.now() - timedelta(days=3),
            reservation__ends_at=timezone.now() - timedelta(days=2), state="released",
        )
        response = ops.post("/api/v1/nodes/bulk-status/", {"node_ids": [allocation.node_id], "status": "retired"},
                            format="json")
        assert response.status_code == 200

    @pytest.mark.parametrize("body,status", [
        ({"node_ids": [], "status": "maintenance"}, 400),
        ({"node_ids": "all", "status": "maintenance"}, 400),
        ({"node_ids": [1], "status": "on-fire"}, 400),
        ({"status": "offline"}, 400),
        ({"node_ids": [999999], "status": "offline"}, 404),
        ({"node_ids": [2**63], "status": "offline"}, 400),  # past a bigint: not a driver overflow
    ])
    def test_bad_bulk_input_is_4xx_and_changes_nothing(self, ops, body, status):
        node = NodeFactory()
        if body.get("node_ids") == [1]:
            body["node_ids"] = [node.pk]
        if body.get("node_ids") == [999999]:
            body["node_ids"] = [node.pk, 999999]
        assert_error(ops.post("/api/v1/nodes/bulk-status/", body, format="json"), status)
        node.refresh_from_db()
        assert node.status == "available"


@pytest.mark.django_db
class TestMaintenanceWindows:
    def test_create_then_cancel_never_deletes(self, ops):
        node = NodeFactory()
        start = timezone.now() + timedelta(days=2)
        created = ops.post("/api/v1/maintenance-windows/",
                           {"node": node.pk, "starts_at": iso(start), "ends_at": iso(start + timedelta(hours=6)),
                            "reason": "PSU swap"}, format="json")
        assert created.status_code == 201, created.content
        window_id = created.json()["window"]["id"]
        cancelled = ops.post(f"/api/v1/maintenance-windows/{window_id}/cancel/")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled_at"]
        assert MaintenanceWindow.objects.filter(pk=window_id).exists()
        assert ops.delete(f"/api/v1/maintenance-windows/{window_id}/").status_code == 405
        actions = sorted(AuditLog.objects.filter(object_type="inventory.maintenancewindow")
                         .values_list("action", flat=True))
        assert actions == ["maintenance_window.cancel", "maintenance_window.create"]

    def test_window_over_a_booking_is_refused_unless_forced(self, ops):
        allocation = AllocationFactory()
        body = {"node": allocation.node_id, "starts_at": iso(allocation.starts_at + timedelta(hours=1)),
                "ends_at": iso(allocation.starts_at + timedelta(hours=2))}
        error = assert_error(ops.post("/api/v1/maintenance-windows/", body, format="json"), 409)
        assert str(allocation.reservation_id) in error["fields"]["starts_at"][0]
        assert not MaintenanceWindow.objects.exists()
        forced = ops.post("/api/v1/maintenance-windows/", body | {"force": True}, format="json")
        assert forced.status_code == 201
        assert forced.json()["affected_allocations"][0]["reservation_id"] == str(allocation.reservation_id)

    @pytest.mark.parametrize("shift", [
        {"starts_at": 2, "ends_at": 1}, {"starts_at": -5, "ends_at": -4}, {"starts_at": None, "ends_at": 1},
    ])
    def test_bad_window_is_400(self, ops, shift):
        node = NodeFactory()
        now = timezone.now()
        body = {"node": node.pk}
        for key, days in shift.items():
            body[key] = iso(now + timedelta(days=days)) if days is not None else "yesterday-ish"
        assert_error(ops.post("/api/v1/maintenance-windows/", body, format="json"), 400)
        assert not MaintenanceWindow.objects.exists()

    def test_a_window_without_a_utc_offset_is_400(self, ops):
        node = NodeFactory()
        error = assert_error(ops.post("/api/v1/maintenance-windows/", {
            "node": node.pk, "starts_at": "2030-01-02T10:00:00", "ends_at": "2030-01-02T12:00:00"}, format="json"), 400)
        assert "must carry a timezone" in str(error["fields"]["starts_at"])
        assert not MaintenanceWindow.objects.exists()

    def test_cancel_unknown_window_is_404(self, ops):
        assert_error(ops.post("/api/v1/maintenance-windows/424242/cancel/"), 404)


@pytest.mark.django_db
class TestPrices:
    def test_ops_set_a_price_and_the_change_is_audited(self, ops):
        price = GpuPriceFactory()
        body = {"gpu_model": price.gpu_model.name, "region": price.region.code, "price_per_gpu_hour": "3.1000"}
        response = ops.post("/api/v1/gpu-prices/", body, format="json")
        assert response.status_code == 201
        row = AuditLog.objects.get(action="gpu_price.set")
        assert (row.before["price_per_gpu_hour"], row.after["price_per_gpu_hour"]) == ("2.5000", "3.1000")

    @pytest.mark.parametrize("change", [
        {"price_per_gpu_hour": "0"}, {"price_per_gpu_hour": "-1"}, {"price_per_gpu_hour": "abc"},
        {"currency": "usd"}, {"region": "mars"}, {"gpu_model": "Z9"},
    ])
    def test_bad_price_is_400_and_keeps_the_old_price(self, ops, change):
        price = GpuPriceFactory()
        body = {"gpu_model": price.gpu_model.name, "region": price.region.code, "price_per_gpu_hour": "3"} | change
        assert_error(ops.post("/api/v1/gpu-prices/", body, format="json"), 400)
        assert GpuPrice.objects.get().price_per_gpu_hour == price.price_per_gpu_hour
