"""Update masks (AIP-134): which fields an Update may change, validated in one place."""

from __future__ import annotations

from collections.abc import Collection

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from db.errors import FieldViolation, ValidationError


def resolve_update_mask(
    mask: field_mask_pb2.FieldMask, resource: Message, mutable: Collection[str]
) -> set[str]:
    """The paths to update.

    An explicit mask must name only mutable paths ("*" means all of them). Without a mask
    every mutable path whose field is populated in `resource` is updated (AIP-134).
    """
    if mask.paths:
        paths = set(mask.paths)
        if "*" in paths:
            return set(mutable)
        unknown = sorted(paths - set(mutable))
        if unknown:
            raise ValidationError(
                [FieldViolation("update_mask", f"{p!r} is not an updatable field") for p in unknown]
            )
        return paths
    return {path for path in mutable if _populated(resource, path)}


def _populated(message: Message, path: str) -> bool:
    head, _, rest = path.partition(".")
    descriptor = message.DESCRIPTOR.fields_by_name.get(head)
    if descriptor is None:
        return False
    value = getattr(message, head)
    if rest:
        return message.HasField(head) and _populated(value, rest)
    if descriptor.message_type is not None and not _is_repeated(descriptor):
        return message.HasField(head)
    return bool(value)


def _is_repeated(descriptor: object) -> bool:
    return bool(getattr(descriptor, "is_repeated", False)) or (
        getattr(descriptor, "label", None) == 3
    )
