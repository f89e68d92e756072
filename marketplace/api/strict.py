"""Input serializers that refuse fields they do not know: a typo is an error, not a silent no-op."""

from collections.abc import Mapping

from rest_framework import serializers


class StrictInputMixin:
    def to_internal_value(self, data):
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class EmptyBodySerializer(StrictInputMixin, serializers.Serializer):
    """For actions that take no input: an empty body or ``{}``; anything else is refused."""
