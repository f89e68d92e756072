from django import forms

from marketplace.core.exceptions import ServiceError
from marketplace.inventory.models import Node
from marketplace.tenants.models import Membership


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Where the token is used, e.g. “training-cluster CI”.")
    expires_at = forms.DateTimeField(required=False, help_text="Optional, UTC, e.g. 2027-01-31 18:00.")


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices)


class MaintenanceWindowForm(forms.Form):
    node = forms.ModelChoiceField(queryset=Node.objects.none())
    starts_at = forms.DateTimeField(help_text="UTC, e.g. 2027-01-31 08:00")
    ends_at = forms.DateTimeField(help_text="UTC")
    reason = forms.CharField(max_length=500, required=False)
    force = forms.BooleanField(required=False, label="Plan it even if the node is booked then")

    def __init__(self, *args, nodes=None, **kwargs):
        super().__init__(*args, **kwargs)
        if nodes is not None:
            self.fields["node"].queryset = nodes


class NodeStatusForm(forms.Form):
    nodes = forms.ModelMultipleChoiceField(queryset=Node.objects.all(), widget=forms.MultipleHiddenInput)
    status = forms.ChoiceField(choices=Node.Status.choices)
    reason = forms.CharField(max_length=500, required=False)
    force = forms.BooleanField(required=False, label="Even if booked")


def add_service_error(form, error: ServiceError) -> None:
    """Shows a service's refusal on the form: its message on top, field details beside the fields."""
    form.add_error(None, error.message)
    for field, problems in error.fields.items():
        if field in form.fields:
            for problem in problems if isinstance(problems, list) else [problems]:
                form.add_error(field, str(problem))
