from django import forms

from marketplace.core.exceptions import ServiceError
from marketplace.inventory.models import Node
from marketplace.tenants.models import Membership

BIGGEST_ID = 2**63 - 1  # a bigint primary key; a larger number is no row, not a database error


def row_id(value) -> int | None:
    """A submitted id as a primary key can be (a whole number up to a bigint), else None: a larger
    number is no row, not a database error."""
    text = str(value).strip()
    return int(text) if text.isascii() and text.isdigit() and 0 < int(text) <= BIGGEST_ID else None


def _row_ids(values) -> list:
    """The submitted ids, refused (as an unknown choice) unless each is a whole number a primary key can be."""
    for value in values:
        if row_id(value) is None:
            raise forms.ValidationError("Select a valid choice. %(value)s is not one of the available choices.",
                                        code="invalid_choice", params={"value": value})
    return values


class NodeChoiceField(forms.ModelChoiceField):
    def to_python(self, value):
        if value not in self.empty_values:
            _row_ids([value])
        return super().to_python(value)


class NodesChoiceField(forms.ModelMultipleChoiceField):
    def _check_values(self, value):
        return super()._check_values(_row_ids(value))


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Where the token is used, e.g. “training-cluster CI”.")
    expires_at = forms.DateTimeField(required=False, help_text="Optional, UTC, e.g. 2027-01-31 18:00.")


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150)
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices)


class MaintenanceWindowForm(forms.Form):
    node = NodeChoiceField(queryset=Node.objects.none())
    starts_at = forms.DateTimeField(help_text="UTC, e.g. 2027-01-31 08:00")
    ends_at = forms.DateTimeField(help_text="UTC")
    reason = forms.CharField(max_length=500, required=False)
    force = forms.BooleanField(required=False, label="Plan it even if the node is booked then")

    def __init__(self, *args, nodes=None, **kwargs):
        super().__init__(*args, **kwargs)
        if nodes is not None:
            self.fields["node"].queryset = nodes


class NodeStatusForm(forms.Form):
    nodes = NodesChoiceField(queryset=Node.objects.all(), widget=forms.MultipleHiddenInput)
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
