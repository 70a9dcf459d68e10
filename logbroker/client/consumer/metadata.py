"""The consumer's view of cluster metadata (Kafka's `ConsumerMetadata`): when to re-read it, and
what a re-read means for the subscription.

Metadata is re-read when it is older than `metadata_max_age_ms`, every second while a subscription
without a group may gain topics (a pattern, or a subscribed topic not there yet), and as soon as
someone marks it `stale` (a fetch failed, a partition has no leader) — at most once per
retry_backoff_ms. A re-read updates the partitions' leaders and, for a subscription without a
group, says which partitions the subscription now covers.
"""

from __future__ import annotations

from collections.abc import Callable

from logbroker.client.consumer.subscription import SubscriptionState, TopicPartition
from logbroker.client.metadata_cache import LogThrottle, MetadataCache
from logbroker.errors import (
    LogbrokerError,
    TopicAuthorizationFailedError,
    UnauthenticatedError,
    UnknownTopicOrPartitionError,
)

# A subscription that may gain topics re-reads metadata this often.
NEW_TOPICS_REFRESH_S = 1.0


class ConsumerMetadata:
    def __init__(self, cache: MetadataCache, subscription: SubscriptionState, max_age_s: float,
                 retry_backoff_s: float, monotonic: Callable[[], float], throttle: LogThrottle) -> None:
        self.cache = cache
        self.stale = False  # re-read at the next chance (no earlier than retry_at)
        self.retry_at = 0.0
        self._subs = subscription
        self._max_age_s = max_age_s
        self._retry_backoff_s = retry_backoff_s
        self._monotonic = monotonic
        self._log = throttle

    def due(self, now: float) -> bool:
        """A re-read is due at `now` (old, or stale, and not backing off)."""
        last = self.cache.last_refresh_monotonic
        due = now >= last + self._max_age_s
        if self._subs.may_gain_topics():
            due = due or now >= last + NEW_TOPICS_REFRESH_S
        return (due or self.stale) and now >= self.retry_at

    def wake_at(self, now: float) -> float | None:
        """When poll() should wake up for a re-read (None: no re-read is pending)."""
        if self.stale or self._subs.may_gain_topics():
            return max(self.retry_at, now + self._retry_backoff_s)
        return None

    def refresh(self, force: bool) -> list[TopicPartition] | None:
        """Re-read metadata (unless backing off and not `force`d) and update the leaders. For a
        subscription without a group: the partitions it covers when they differ from the assignment
        (the caller assigns them, and updates leaders then); else None."""
        now = self._monotonic()
        if not force and now < self.retry_at:
            return None
        self.retry_at = now + self._retry_backoff_s
        subs = self._subs
        standalone = subs.subscribed() and not subs.group_managed  # every partition of the subscription
        topics = {t for t, _ in subs.assigned}
        if standalone:
            topics |= set(subs.topics or ())
        every_topic = standalone and subs.pattern is not None
        if topics or every_topic:
            try:
                self.cache.refresh(None if every_topic else sorted(topics), retry=force)
            except UnauthenticatedError:
                raise  # a refused certificate: poll() raises it, as Kafka's AuthenticationException
            except LogbrokerError as e:
                self._log.warning("metadata", "metadata refresh failed: %s", e)
                return None  # subscribed topics get assigned once a refresh succeeds
        self.stale = False
        if standalone:
            wanted = self.subscribed_partitions()
            if set(wanted) != set(subs.assigned):
                return wanted
        self.update_leaders()
        return None

    def subscribed_partitions(self) -> list[TopicPartition]:
        """Every partition of the subscribed topics and of the topics matching the pattern."""
        subs = self._subs
        names = list(subs.topics or ())
        if subs.pattern is not None:
            pattern = subs.pattern
            names += sorted(t for t in self.cache.topics()
                            if pattern.fullmatch(t) and not t.startswith("__") and t not in names)
        wanted: list[TopicPartition] = []
        for t in names:
            n = self.cache.cached_partitions(t)
            if n is not None:
                wanted.extend((t, p) for p in range(n))
        return wanted

    def update_leaders(self) -> None:
        for st in self._subs.assigned.values():
            try:
                st.leader = self.cache.leader(st.topic, st.partition)
            except UnknownTopicOrPartitionError:
                st.leader = None
                if self.cache.unauthorized(st.topic):  # ACLs: poll() raises it, as Kafka's consumer does
                    raise TopicAuthorizationFailedError(f"not authorized to describe topic {st.topic!r}") from None
