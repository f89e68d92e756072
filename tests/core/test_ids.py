"""Time-ordered identifiers."""

import uuid

from marketplace.core.ids import uuid7


def test_uuid7_is_a_version_7_rfc_uuid_carrying_the_time():
    before = uuid.UUID(int=0)
    value = uuid7()
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert value > before


def test_uuid7_keys_made_later_sort_later_and_do_not_repeat(monkeypatch):
    # given keys made at three successive milliseconds
    import marketplace.core.ids as ids

    made = []
    for ms in (1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002):
        monkeypatch.setattr(ids.time, "time_ns", lambda ms=ms: ms * 1_000_000)
        made.append(uuid7())
    # then they sort in the order made, and their leading 48 bits are the milliseconds
    assert made == sorted(made)
    assert [value.int >> 80 for value in made] == [1_700_000_000_000, 1_700_000_000_001, 1_700_000_000_002]
    # and many keys made in one millisecond are all different
    assert len({uuid7() for _ in range(10_000)}) == 10_000
