"""The caller's tenant, its members, API tokens and audit log; and the staff API for tenants."""

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from marketplace.api.permissions import IsStaff
from marketplace.api.scoping import TenantScopedViewSet
from marketplace.api.strict import AwareDateTimeField, EmptyBodySerializer, ParseBodyFirstMixin, StrictInputMixin
from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.tenants import services
from marketplace.tenants.models import ApiToken, Membership, Tenant
from marketplace.tenants.selectors import membership_for


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = fields


class ApiTokenCreateSerializer(StrictInputMixin, serializers.Serializer):
    name = serializers.CharField(max_length=100)
    expires_at = AwareDateTimeField(required=False, allow_null=True)


class AuditLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditLog
        fields = ["id", "at", "actor", "action", "object_type", "object_id", "before", "after", "message"]


class TenantSerializer(serializers.ModelSerializer):
    class Meta:
        model = Tenant
        fields = ["slug", "name", "billing_status", "gpu_quota", "is_active"]
        read_only_fields = fields


class CurrentTenantSerializer(TenantSerializer):
    can_book = serializers.BooleanField(read_only=True)
    your_role = serializers.SerializerMethodField()

    class Meta(TenantSerializer.Meta):
        fields = [*TenantSerializer.Meta.fields, "can_book", "your_role"]
        read_only_fields = fields

    def get_your_role(self, tenant) -> str | None:
        membership = membership_for(user=self.context["request"].user, tenant=tenant)
        return membership.role if membership else None


class StaffTenantSerializer(StrictInputMixin, serializers.ModelSerializer):
    class Meta:
        model = Tenant
        fields = ["slug", "name", "billing_status", "gpu_quota", "kubernetes_group", "is_active", "created_at"]
        read_only_fields = ["is_active", "created_at"]
        validators = []  # uniqueness and the slug rule are the service's (one message, one place)
        extra_kwargs = {"slug": {"validators": []}}


class StaffTenantUpdateSerializer(StrictInputMixin, serializers.ModelSerializer):
    class Meta:
        model = Tenant
        fields = ["name", "billing_status", "gpu_quota", "kubernetes_group", "is_active"]


class MembershipSerializer(serializers.ModelSerializer):
    username = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = Membership
        fields = ["id", "username", "role", "created_at"]
        read_only_fields = ["id", "username", "created_at"]


class MembershipCreateSerializer(StrictInputMixin, serializers.Serializer):
    username = serializers.CharField(max_length=150)
    role = serializers.ChoiceField(choices=Membership.Role.choices, default=Membership.Role.MEMBER)


class MembershipRoleSerializer(StrictInputMixin, serializers.Serializer):
    role = serializers.ChoiceField(choices=Membership.Role.choices)


class SingleObjectSchema(AutoSchema):
    """The current-tenant endpoint answers one object at its collection URL."""

    def _is_list_view(self, serializer=None) -> bool:
        return False


class CurrentTenantViewSet(TenantScopedViewSet):
    """``GET /api/v1/tenant/``: the tenant you act for (the token's tenant), with your role in it."""

    serializer_class = CurrentTenantSerializer
    scoped_model = Tenant
    lookup_field = "slug"
    schema = SingleObjectSchema()
    pagination_class = None
    filter_backends = []

    def tenant_queryset(self, tenant):
        return Tenant.objects.filter(pk=tenant.pk) if tenant is not None else Tenant.objects.none()

    def list(self, request):
        return Response(self.get_serializer(self.get_queryset().get()).data)


class MembershipViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Members of your tenant. Owners add existing users and change roles."""

    serializer_class = MembershipSerializer
    scoped_model = Membership
    filterset_fields = ["role"]

    def tenant_queryset(self, tenant):
        return Membership.objects.for_tenant(tenant).select_related("user").order_by("user__username")

    @extend_schema(request=MembershipCreateSerializer, responses={201: MembershipSerializer})
    def create(self, request):
        data = MembershipCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_create(actor=Actor.for_user(request.user), by=request.user,
                                                tenant=self.tenant, **data.validated_data)
        return Response(MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=MembershipRoleSerializer, responses=MembershipSerializer)
    def partial_update(self, request, pk=None):
        membership = self.get_object()  # 404 for another tenant's member
        data = MembershipRoleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_change_role(actor=Actor.for_user(request.user), by=request.user,
                                                     tenant=self.tenant, membership_id=membership.pk,
                                                     role=data.validated_data["role"])
        return Response(MembershipSerializer(membership).data)


class StaffTenantViewSet(ParseBodyFirstMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Ops: every tenant; create one, change its billing status, quota or name."""

    permission_classes = [IsStaff]
    serializer_class = StaffTenantSerializer
    lookup_field = "slug"
    queryset = Tenant.objects.order_by("slug")
    filterset_fields = ["billing_status", "is_active"]

    @extend_schema(request=StaffTenantSerializer, responses={201: StaffTenantSerializer})
    def create(self, request):
        data = StaffTenantSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = services.tenant_create(actor=Actor.for_user(request.user), **data.validated_data)
        return Response(StaffTenantSerializer(tenant).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=StaffTenantUpdateSerializer, responses=StaffTenantSerializer)
    def partial_update(self, request, slug=None):
        data = StaffTenantUpdateSerializer(data=request.data, partial=True)
        data.is_valid(raise_exception=True)
        tenant = services.tenant_update(actor=Actor.for_user(request.user), tenant=self.get_object(),
                                        **data.validated_data)
        return Response(StaffTenantSerializer(tenant).data)


class ApiTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, TenantScopedViewSet):
    """Your own API tokens for the current tenant. The secret is returned once, at creation."""

    serializer_class = ApiTokenSerializer
    scoped_model = ApiToken

    def tenant_queryset(self, tenant):
        return ApiToken.objects.for_tenant(tenant).filter(user=self.request.user)

    def create(self, request):
        data = ApiTokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = services.api_token_issue(
            actor=Actor.for_user(request.user), user=request.user, tenant=self.tenant, **data.validated_data
        )
        body = ApiTokenSerializer(issued.token).data | {"token": issued.raw}
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=ApiTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        token = self.get_object()  # 404 for someone else's token
        EmptyBodySerializer(data=request.data).is_valid(raise_exception=True)
        token = services.api_token_revoke(actor=Actor.for_user(request.user), token_id=token.pk, tenant=self.tenant)
        return Response(ApiTokenSerializer(token).data)


class AuditLogViewSet(mixins.ListModelMixin, TenantScopedViewSet):
    serializer_class = AuditLogSerializer
    scoped_model = AuditLog
    filterset_fields = ["action", "object_type", "object_id"]


def register(router) -> None:
    router.register("tenant", CurrentTenantViewSet, basename="current-tenant")
    router.register("members", MembershipViewSet, basename="member")
    router.register("tenants", StaffTenantViewSet, basename="tenant")
    router.register("tokens", ApiTokenViewSet, basename="token")
    router.register("audit-log", AuditLogViewSet, basename="audit-log")
