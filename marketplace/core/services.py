from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import models, transaction

from marketplace.core.models import AuditLog


class Actor:
    """Who performs a change: a person (with their user row) or a task/system process."""

    def __init__(self, label: str, user: AbstractBaseUser | None = None) -> None:
        self.label = label
        self.user = user

    @classmethod
    def for_user(cls, user: AbstractBaseUser) -> "Actor":
        return cls(f"user:{user.get_username()}", user)

    @classmethod
    def task(cls, name: str) -> "Actor":
        return cls(f"task:{name}")

    def __repr__(self) -> str:
        return f"Actor({self.label!r})"


SYSTEM = Actor("system")


def audit_values(
    *,
    actor: Actor,
    action: str,
    obj: models.Model,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    tenant: Any = None,
    tenant_id: int | None = None,
    message: str = "",
) -> dict[str, Any]:
    """The column values of the audit row for a change (all but ``at``), for callers that write it themselves."""
    return {
        "actor": actor.label,
        "actor_user_id": actor.user.pk if actor.user is not None and actor.user.pk else None,
        "tenant_id": tenant.pk if tenant is not None else tenant_id,
        "action": action,
        "object_type": obj._meta.label_lower,
        "object_id": str(obj.pk),
        "before": before,
        "after": after,
        "message": message,
    }


def audit_entry(
    *,
    actor: Actor,
    action: str,
    obj: models.Model,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    tenant: Any = None,
    tenant_id: int | None = None,
    message: str = "",
) -> AuditLog:
    """The audit row for a change, not yet saved: for callers that insert several rows at once."""
    return AuditLog(**audit_values(actor=actor, action=action, obj=obj, before=before, after=after, tenant=tenant,
                                   tenant_id=tenant_id, message=message))


def audit_record(
    *,
    actor: Actor,
    action: str,
    obj: models.Model,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    tenant: Any = None,
    tenant_id: int | None = None,
    message: str = "",
) -> AuditLog:
    entry = audit_entry(actor=actor, action=action, obj=obj, before=before, after=after, tenant=tenant,
                        tenant_id=tenant_id, message=message)
    entry.save(force_insert=True)
    return entry


def snapshot(obj: models.Model, fields: list[str]) -> dict[str, Any]:
    """A JSON-safe picture of some fields, for the audit log's before/after."""
    result: dict[str, Any] = {}
    for name in fields:
        value = getattr(obj, name)
        if isinstance(value, models.Model):
            value = value.pk
        result[name] = value if isinstance(value, (int, bool, type(None))) else str(value)
    return result


def audited_update(
    *,
    actor: Actor,
    obj: models.Model,
    changes: dict[str, Any],
    allowed: set[str],
    audit_fields: list[str],
    action: str,
    tenant: Any = None,
) -> models.Model:
    """Change some fields of one row: refuse fields not in ``allowed``, lock the row, validate, save,
    and write an audit row with before/after when anything really changed."""
    from marketplace.core.exceptions import InvalidInput

    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise InvalidInput(f"Cannot change {', '.join(unknown)} here.",
                           fields={name: ["cannot be changed"] for name in unknown})
    with transaction.atomic():
        obj = type(obj).objects.select_for_update().get(pk=obj.pk)
        before = snapshot(obj, audit_fields)
        for key, value in changes.items():
            setattr(obj, key, value)
        obj.full_clean()
        obj.save()
        after = snapshot(obj, audit_fields)
        if before != after:
            audit_record(actor=actor, action=action, obj=obj, tenant=tenant, before=before, after=after)
    return obj
