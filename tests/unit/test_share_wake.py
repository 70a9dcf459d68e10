"""Which settles wake a waiting ShareFetch (group/share_coordinator.py `may_free`): only those that
may make records available to another member. Pure: no broker."""

from __future__ import annotations

import dataclasses

from logbroker.group.share_coordinator import may_free
from logbroker.group.share_partition import AckType, SharePartition
from logbroker.group.share_settings import ShareSettings


def test_only_releases_key_ordered_settles_and_full_windows_may_free_records() -> None:
    roomy = SharePartition(ShareSettings(), 0)
    roomy.add_records(0, 9, 0)
    assert may_free(roomy, AckType.RELEASE)
    assert not any(may_free(roomy, t) for t in (AckType.ACCEPT, AckType.GAP, AckType.REJECT, AckType.RENEW))
    keyed = SharePartition(dataclasses.replace(ShareSettings(), ordering="key"), 0)
    assert may_free(keyed, AckType.ACCEPT)  # the key's next record may go now
    full = SharePartition(dataclasses.replace(ShareSettings(), max_in_flight_records=10), 0)
    full.add_records(0, 9, 0)
    assert full.room() == 0 and may_free(full, AckType.ACCEPT)  # the window reads on once it settles
