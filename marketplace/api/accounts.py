"""The caller's tenant, its API tokens, and its audit log."""

from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from marketplace.api.scoping import TenantScopedViewSet
from marketplace.core.models import AuditLog
from marketplace.core.services import Actor
from marketplace.tenants import services
from marketplace.tenants.models import ApiToken


class ApiTokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = fields


class ApiTokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class AuditLogSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditLog
        fields = ["id", "at", "actor", "action", "object_type", "object_id", "before", "after", "message"]


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

    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        token = self.get_object()  # 404 for someone else's token
        token = services.api_token_revoke(actor=Actor.for_user(request.user), token_id=token.pk, tenant=self.tenant)
        return Response(ApiTokenSerializer(token).data)


class AuditLogViewSet(mixins.ListModelMixin, TenantScopedViewSet):
    serializer_class = AuditLogSerializer
    scoped_model = AuditLog
    filterset_fields = ["action", "object_type", "object_id"]


def register(router) -> None:
    router.register("tokens", ApiTokenViewSet, basename="token")
    router.register("audit-log", AuditLogViewSet, basename="audit-log")
