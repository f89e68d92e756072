"""Tenant account pages: API tokens (secret shown once) and members."""

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from marketplace.core.exceptions import ServiceError
from marketplace.core.services import Actor
from marketplace.tenants import services
from marketplace.tenants.selectors import api_tokens_of, member_can_write, members_of, membership_for
from marketplace.web.forms import MemberAddForm, RoleForm, TokenCreateForm, add_service_error
from marketplace.web.views import tenant_required


@tenant_required
def tokens(request, tenant):
    can_write = request.user.is_staff or member_can_write(user=request.user, tenant=tenant)
    if request.method == "POST" and not can_write:
        # Same rule as the API (HasTenant): viewers change nothing.
        raise PermissionDenied("Viewers cannot create API tokens; ask an owner of your tenant.")
    form = TokenCreateForm(request.POST or None)
    issued = None
    if request.method == "POST" and form.is_valid():
        try:
            issued = services.api_token_issue(actor=Actor.for_user(request.user), user=request.user, tenant=tenant,
                                              **form.cleaned_data)
        except ServiceError as error:
            add_service_error(form, error)
        else:
            # Rendered, not redirected: this response is the only time the secret exists in clear.
            form = TokenCreateForm()
    return render(request, "web/account/tokens.html", {
        "tenant": tenant, "form": form, "issued": issued, "tokens": api_tokens_of(user=request.user, tenant=tenant),
        "can_write": can_write,
    }, status=400 if form.errors else 200)


@tenant_required
@require_POST
def token_revoke(request, tenant, token_id: int):
    if not (request.user.is_staff or member_can_write(user=request.user, tenant=tenant)):
        # Same rule as the API (HasTenant): viewers change nothing.
        raise PermissionDenied("Viewers cannot revoke API tokens; ask an owner of your tenant.")
    try:
        token = services.api_token_revoke(actor=Actor.for_user(request.user), token_id=token_id, tenant=tenant,
                                          user=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Token “{token.name}” revoked.")
    return redirect("web:tokens")


@tenant_required
def members(request, tenant):
    form = MemberAddForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            membership = services.membership_create(actor=Actor.for_user(request.user), by=request.user,
                                                    tenant=tenant, **form.cleaned_data)
        except ServiceError as error:
            add_service_error(form, error)
        else:
            messages.success(request, f"{membership.user.username} added as {membership.get_role_display()}.")
            return redirect("web:members")
    membership = membership_for(user=request.user, tenant=tenant)
    return render(request, "web/account/members.html", {
        "tenant": tenant, "form": form, "members": members_of(tenant=tenant), "roles": RoleForm.base_fields["role"].choices,
        "is_owner": request.user.is_staff or (membership is not None and membership.role == membership.Role.OWNER),
    }, status=400 if form.errors else 200)


@tenant_required
@require_POST
def member_role(request, tenant, membership_id: int):
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles.")
        return redirect("web:members")
    try:
        membership = services.membership_change_role(actor=Actor.for_user(request.user), by=request.user,
                                                     tenant=tenant, membership_id=membership_id,
                                                     role=form.cleaned_data["role"])
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"{membership.user.username} is now {membership.get_role_display()}.")
    return redirect("web:members")
