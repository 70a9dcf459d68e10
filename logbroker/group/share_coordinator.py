"""The share-group (queue) coordinator: the shell around `share_group.ShareGroup` and
`share_partition.SharePartition` on a broker.

Where the state lives. A share group is coordinated by the coordinator of its group id (the leader
of `__consumer_offsets`-`hash(group)`, as consumer groups; group/coordinator.py), and its durable
state is records in that partition (group/offsets.py: a settings record per group, a snapshot
record per share partition), compacted by key, replayed by a new coordinator after a failover. So
the share state moves with the leadership of the group's offsets partition, and needs no other
replication: an acknowledgement is answered only once the snapshot that holds it is replicated to
the offsets partition's ISR.

One ShareFetch (the member's acknowledgements ride on it)::

    check the member (join at epoch 0, leave at -1)
    apply its acknowledgements, range by range (each all or nothing; results per range); their
    dead letters, then the snapshots they changed, start being written now (see Persistence)
    loop until records are acquired or max_wait_ms passes:
        read new records into each partition's window (share_data.py: local log or the leader),
        the partitions of the member's topics and of their priority-level topics
        acquire up to max_records, round robin over the partitions; a topic's priority levels
        highest first, or by its priority_weights (priority_drain.py)
        else wait (a settle, a lock expiry or new data wakes one waiting fetch at a time, `_wake`;
        each waiter also looks again every tick)
    read the record batches that hold the acquired records (whole batches: the client keeps only
    its offsets); a partition that cannot be read now gives its acquisitions back (undone, count
    as before) and answers with its error
    write the dead letters of the acquisition (acks=all to the dead-letter topic), then the
    snapshots of partitions created, skipped forward or with expired records (rare; waited for);
    an acquisition alone writes nothing
    wait until the acknowledgements' snapshots are replicated   <- only then answer
    answer: per partition, the acquired offset ranges with delivery counts, and those batches

Persistence. A snapshot is written (acks=all to the offsets partition) by a per-group flush
scheduled with `loop.call_soon` when the first change of a loop iteration is queued (`_mark`): every
fetch, acknowledgement and tick that changed the group in that iteration shares one append, taken
from the state as it is when the flush runs. The flush appends synchronously, so flushes land in
the order their snapshots were taken (a later snapshot of a partition is never overwritten by an
earlier one), and its future resolves once they are replicated: at once, within `_flush`, when
every append was replicated as it landed (append_now's done future: an ISR of the leader alone), so
a fetch waiting on that future (its acknowledgements') answers without a loop turn more.

What waits for that future, and what does not:
- Settling (acknowledgements on a ShareFetch or a ShareAcknowledge, a leave, a join's releases, a
  purge, the tick's expiries, group creation): answered only once durable. An acknowledged record
  is never handed out again, even after a failover or kill -9 of the coordinator.
- Acquisition: not written on its own at all. The next snapshot of the partition (its
  settle, above all: a queue's records are acquired and settled in turn, and the settle's snapshot
  holds the acquisitions of the moment; a lock expiry, the tick's) carries it. Losing an
  acquisition in a failover only hands the record out again, as its lock expiring would:
  at-least-once is unchanged, and an acknowledged record still never comes back. What can go back
  is the delivery count: records acquired since the partition's last snapshot are handed out by
  a new coordinator with the count of that snapshot, so max_delivery_attempts may allow more
  attempts across such a failover (an expiry is written, so a consumer that dies holding a record
  still counts). Partitions created, skipped forward or with expired records are written and
  waited for as before (rare; a lost creation at "latest" would start the group later).
  So a fetch costs no append of its own, and a fetch carrying acknowledgements waits for their
  persist while it waits for records, not after.
A background tick gives back expired locks and evicts silent members (persisting what changed).

Dead letters: a rejected record, or one whose last attempt failed, is copied (key, value, headers,
plus share_headers.DLQ_* headers) to the group's dead-letter topic, created on demand with the
source's partition count and replication factor, into partition `source partition % count`. The
copy is written before the state that archives the record, so a crash in between dead-letters
it twice rather than never. A dead-letter write that fails is logged and counted, and the record
stays archived (a known gap: it is not retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from logbroker.clock import Clock
from logbroker.cluster.cluster_view import partition_ids, partition_parents
from logbroker.cluster.lineage import child_ready
from logbroker.cluster.metadata import validate_topic_name
from logbroker.cluster.priority_levels import level_topic, parse_level_topic, parse_levels, parse_weights
from logbroker.errors import (
    BrokerError,
    GroupIdNotFoundError,
    InconsistentGroupProtocolError,
    InvalidConfigError,
    InvalidFilterError,
    InvalidRequestError,
    OffsetOutOfRangeError,
    UnknownMemberIdError,
)
from logbroker.group import share_headers as H
from logbroker.group.offsets import (
    OFFSETS_TOPIC,
    OffsetsState,
    records_batch,
    share_deferred_record,
    share_group_record,
    share_partition_record,
)
from logbroker.group.priority_drain import LevelDrain, drain
from logbroker.group.share_data import ReadResult, ShareDataSource
from logbroker.group.share_group import ShareGroup, ShareMember, TopicPartition, check_member_id
from logbroker.group.share_partition import AckType, Acquired, DeadLetter, SharePartition, key_hash
from logbroker.group.share_settings import ShareLimits, ShareSettings
from logbroker.storage.record_batch import BatchBuilder, BatchHeader, check_batch, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.group.coordinator import GroupCoordinator, _Shard
    from logbroker.group.record_filter import RecordFilter

log = logging.getLogger(__name__)

TICK_S = 0.02                 # how often a waiting fetch checks for new data, and locks are checked
MAX_RECORDS_DEFAULT = 500
MAX_RECORDS_MAX = 10_000
MAX_WAIT_MS_MAX = 30_000
ACK_RANGES_MAX = 20_000       # per request
READ_CHUNK_BYTES = 1 << 20
RESPONSE_BYTES_MAX = 16 << 20  # records read to answer one fetch (bounded; the rest stay acquired briefly)
SNAPSHOT_BATCH_BYTES = 512 << 10
DLQ_TIMEOUT_MS = 10_000
# Records a group's filter evaluates per partition read, on the event loop (record_filter.py): a
# translated filter costs ~2 us per record with decoding (at most ~40 ms here), one left to
# cel-python ~110 us (at most ~35 ms); the rest of what was read is read again on the next round.
FILTER_RECORDS_PER_READ = 20_000
CELPY_FILTER_RECORDS_PER_READ = 300
FILTER_CACHE_SIZE = 256

SETTING_FIELDS = ("lock_ms", "max_delivery_attempts", "retry_backoff_ms", "retry_backoff_max_ms",
                  "dead_letter_topic", "dead_letter_expired", "max_in_flight_records", "auto_offset_reset",
                  "ordering", "filter")

Dead = list[tuple[TopicPartition, DeadLetter]]


def settings_changes(msg: pb.ShareGroupSettings) -> dict[str, Any]:
    return {name: getattr(msg, name) for name in SETTING_FIELDS if msg.HasField(name)}


def fill_settings(out: pb.ShareGroupSettings, s: ShareSettings) -> None:
    for name in SETTING_FIELDS:
        setattr(out, name, getattr(s, name))


class ShareCoordinator:
    """See the module doc. All state is owned by the broker's event loop."""

    def __init__(self, groups: GroupCoordinator, data: ShareDataSource, clock: Clock,
                 limits: ShareLimits | None = None) -> None:
        self._gc = groups
        self._data = data
        self.clock = clock
        self.limits = limits or ShareLimits()
        self._waiters: dict[str, deque[asyncio.Future[bool]]] = {}  # fetches waiting for records, by group
        self._woken: dict[str, set[asyncio.Future[bool]]] = {}  # woken, not yet looked: see _wake
        self._filters: dict[str, RecordFilter] = {}  # compiled group filters, by expression
        self._pending: dict[int, _PendingPersist] = {}  # by id(group): snapshots due in this iteration's flush
        self._task: asyncio.Task[None] | None = None
        groups.share_restore = self.restore

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._tick_loop(), name="share-groups")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- loading -----------------------------------------------------------------------------------

    def restore(self, shard: _Shard, state: OffsetsState) -> None:
        """Called by the group coordinator when it loaded an offsets partition: rebuild its share groups."""
        groups: dict[str, ShareGroup] = {}
        for name, raw in state.share_groups.items():
            try:
                settings = ShareSettings.from_json(dict(raw))
            except (TypeError, ValueError) as e:
                log.warning("share group %s: unreadable settings (%s): defaults used", name, e)
                settings = ShareSettings()
            groups[name] = self._new_group(name, settings)
        for (name, topic, partition), snapshot in state.share_partitions.items():
            g = groups.get(name)
            if g is None:
                continue
            try:
                g.partitions[(topic, partition)] = SharePartition.restore(
                    snapshot, g.settings, state.share_deferred.get((name, topic, partition)))
            except ValueError as e:
                log.warning("share group %s: unreadable state of %s-%d (%s): it starts again from the log end",
                            name, topic, partition, e)
        shard.share_groups = groups
        if groups:
            log.info("share groups of %s-%d loaded: %d groups, %d partitions", OFFSETS_TOPIC, shard.partition,
                     len(groups), sum(len(g.partitions) for g in groups.values()))

    def _new_group(self, name: str, settings: ShareSettings) -> ShareGroup:
        cfg = self._gc.config
        return ShareGroup(name, settings, session_timeout_ms=cfg.session_timeout_ms, members_max=cfg.group_members_max)

    def _shard_and_group(self, name: str) -> tuple[_Shard, ShareGroup | None]:
        shard = self._gc.shard_for(name)
        if self._gc.has_consumer_group(shard, name):
            raise InconsistentGroupProtocolError(f"{name} is a consumer group, not a share group")
        return shard, shard.share_groups.get(name)

    def _wake(self, name: str) -> None:
        """Something may have become available in group `name` (new records, a settle, an expired
        lock): wake ONE waiting fetch, the longest waiting, unless one woken already has not yet
        looked; a fetch that filled its max_records wakes the next (`_acquire_loop`), so the waiters
        are woken one after another while there is more to take, and an arrival costs one fetch's
        look rather than every member's. (A member woken for records it does not subscribe to, or
        cannot take, wakes nobody: the others look at their next tick, TICK_S.)"""
        if self._woken.get(name):
            return
        waiters = self._waiters.get(name)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                self._woken.setdefault(name, set()).add(fut)
                return

    async def _wait(self, name: str, topics: Iterable[str], wait_s: float) -> None:
        """Wait in group `name`'s queue of fetches until woken (`_wake`) or `wait_s` passes."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        waiters = self._waiters.setdefault(name, deque())
        waiters.append(fut)
        timer = loop.call_later(wait_s, _time_up, fut)
        end_watch = self._watch_arrivals(name, topics, fut)
        try:
            await fut
        finally:
            timer.cancel()
            if end_watch is not None:
                end_watch()
            woken = self._woken.get(name)
            if woken is not None:
                woken.discard(fut)
            with contextlib.suppress(ValueError):  # timed out or cancelled: no longer waiting
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(name, None)

    # -- ShareFetch --------------------------------------------------------------------------------

    async def share_fetch(self, req: pb.ShareFetchRequest) -> pb.ShareFetchResponse:
        resp = pb.ShareFetchResponse(member_epoch=req.member_epoch)
        try:
            if len(req.topics) > 1000:
                raise InvalidRequestError(f"{len(req.topics)} topics; the limit is 1000")
            for topic in req.topics:
                validate_topic_name(topic)  # INVALID_TOPIC: a subscription holds only names a topic can have
            check_member_id(req.member_id)
            shard, g = self._shard_and_group(req.group)
            if g is None:
                if req.member_epoch != 0:
                    raise UnknownMemberIdError(f"share group {req.group} does not exist here: join with epoch 0")
                g = await self._create(shard, req.group, settings_changes(req.settings))
            elif req.member_epoch == 0:
                _check_member_filter(g, req.settings)
            changed: set[TopicPartition] = set()
            dead: Dead = []
            mono = self.clock.monotonic_ms()
            if req.member_epoch == 0:
                member, released = g.join(req.member_id, list(req.topics), mono)
                dead += released
                changed.update(tp for tp, _ in released)
                if released:
                    self._wake(g.name)
            else:
                member = g.check(req.member_id, g.members[req.member_id].epoch if req.member_epoch == -1
                                 and req.member_id in g.members else req.member_epoch, mono)
            frees = self._apply_acks(g, member.member_id, req.acknowledgements, resp.ack_results, changed, dead)
            if req.member_epoch == -1:
                released = g.leave(member.member_id, self.clock.now_ms())
                dead += released
                changed.update(tp for tp, _ in released)
                frees = frees or bool(released)
                await self._persist(shard, g, changed, dead)
            else:
                await self._fetch_records(resp, shard, g, member, req, changed, dead)
            if frees:
                self._wake(g.name)
            resp.member_epoch = member.epoch if req.member_epoch != -1 else -1
            resp.lock_ms = g.settings.lock_ms
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    async def _fetch_records(self, resp: pb.ShareFetchResponse, shard: _Shard, g: ShareGroup, member: ShareMember,
                             req: pb.ShareFetchRequest, changed: set[TopicPartition], dead: Dead) -> None:
        """Acquire and read records for `member`. What the request settled (acknowledgements, a
        join's releases) is durable before the answer, its persist running while the fetch waits
        for records; the acquisitions are not written on their own (module doc)."""
        settled: Awaitable[None] | None = None
        if dead:
            settled = asyncio.ensure_future(self._persist(shard, g, set(changed), list(dead)))
        elif changed:  # the flush's own future: once it is done, the answer waits no loop turn for it
            settled = asyncio.shield(self._mark(shard, g, set(changed)))
        acquired_changed: set[TopicPartition] = set()
        acquired_dead: Dead = []
        try:
            acquired = await self._acquire_loop(shard, g, member, req, acquired_changed, acquired_dead)
            await self._fill_records(resp, g, member.member_id, acquired)
            await self._persist(shard, g, acquired_changed, acquired_dead)  # rare: creation, skips, expiries
        finally:
            if settled is not None:
                await settled

    async def _create(self, shard: _Shard, name: str, changes: dict[str, Any]) -> ShareGroup:
        settings = ShareSettings().updated(changes, self.limits)
        g = self._new_group(name, settings)
        shard.share_groups[name] = g
        try:
            await self._gc.append_replicated(shard, name, records_batch([share_group_record(name, settings.to_json())],
                                                                        self.clock.now_ms()))
        except BaseException:
            if shard.share_groups.get(name) is g and not g.members:
                del shard.share_groups[name]
            raise
        log.info("share group %s created: %s", name, settings)
        return g

    def _apply_acks(self, g: ShareGroup, member_id: str, acks: Iterable[pb.ShareAcknowledgement],
                    results: Any, changed: set[TopicPartition], dead: Dead) -> bool:
        """Apply the acknowledgements range by range; whether they may have made records available
        to another member (`may_free`), so waiting fetches are woken only then: an ACCEPT of a
        queue's record frees nothing another member could take, and waking one for it costs a
        fetch a whole round (at 1,000 request-replies/s about every other wake was such a one)."""
        acks = list(acks)
        frees = False
        if sum(len(a.ranges) for a in acks) > ACK_RANGES_MAX:
            raise InvalidRequestError(f"more than {ACK_RANGES_MAX} acknowledgement ranges in one request")
        now = self.clock.now_ms()
        for a in acks:
            tp = (a.topic, a.partition)
            sp = g.partitions.get(tp)
            for r in a.ranges:
                out = results.add(topic=a.topic, partition=a.partition, first_offset=r.first_offset,
                                  last_offset=r.last_offset)
                try:
                    if sp is None:
                        raise OffsetOutOfRangeError(f"share group {g.name} has handed out nothing of {tp[0]}-{tp[1]}")
                    reason = r.reason[: H.REASON_TEXT_MAX_CHARS]
                    frees = frees or may_free(sp, r.type)
                    dead += [(tp, d) for d in sp.acknowledge(member_id, r.first_offset, r.last_offset, r.type, now,
                                                             r.delay_ms, reason)]
                    changed.add(tp)
                except BrokerError as e:
                    out.error_code = e.code
                    out.error_message = e.message
        return frees

    async def _acquire_loop(self, shard: _Shard, g: ShareGroup, member: ShareMember, req: pb.ShareFetchRequest,
                            changed: set[TopicPartition], dead: Dead) -> dict[TopicPartition, list[Acquired]]:
        max_records = min(req.max_records or MAX_RECORDS_DEFAULT, MAX_RECORDS_MAX)
        if max_records < 0 or req.max_wait_ms < 0:
            raise InvalidRequestError("max_records and max_wait_ms must not be negative")
        deadline = self.clock.monotonic_ms() + min(req.max_wait_ms, MAX_WAIT_MS_MAX)
        while True:
            logs, weights = await self._priority_logs(member.topics)
            unreadable = await self._read_new(g, logs, changed)
            if self._gc.shard_for(g.name) is not shard or shard.share_groups.get(g.name) is not g:
                raise UnknownMemberIdError(f"share group {g.name} was reloaded: join again")
            g.check(member.member_id, member.epoch, self.clock.monotonic_ms())
            got = self._acquire(g, member, max_records, changed, dead, unreadable, (set(logs), weights))
            if sum(r.last_offset - r.first_offset + 1 for runs in got.values() for r in runs) >= max_records:
                self._wake(g.name)  # it took all it could: there may be more for the next waiting fetch
            if got or self.clock.monotonic_ms() >= deadline:
                return got
            await self._wait(g.name, member.topics, min(TICK_S, max(0, deadline - self.clock.monotonic_ms()) / 1000))

    def _watch_arrivals(self, name: str, topics: Iterable[str], waiter: asyncio.Future[bool]) -> Callable[[], None] | None:
        """Wake group `name`'s waiting fetches (`_wake`) as soon as a local partition of `topics`
        gets new records (an append notifies the replica manager's fetch purgatory), not only at the
        next tick: request-reply's round trip waits on it. The watch is registered before this
        returns, so an append in the same loop iteration is not missed, and it stays armed while
        `waiter` waits: an append wakes one fetch, and the others must hear the next one (a one-shot
        watch left them deaf until their tick, up to TICK_S, after every append). Returns the
        function that ends it; None when the data source has no purgatory."""
        keys = [(t, p) for t in topics for p in partition_ids(self._gc.cluster, t)]
        watch = getattr(self._data, "arrival_watch", None)  # ShareData's; test doubles may lack it
        if watch is None or not keys:
            return None
        end: Callable[[], None] | None = watch(keys, lambda: self._wake(name), lambda: not waiter.done())
        return end

    async def _read_new(self, g: ShareGroup, topics: Iterable[str], changed: set[TopicPartition]) -> set[TopicPartition]:
        """Bring new records into the windows of the member's partitions (creating share partitions
        at the group's start position the first time), all read in one `read_many` (one Fetch per
        remote leader; a local partition with nothing new past the window is not read at all: a
        waiting fetch looks at every partition each round); returns the partitions that could not be read (no reachable leader now:
        nothing is handed out from them this round)."""
        unreadable: set[TopicPartition] = set()
        wants: dict[TopicPartition, int] = {}
        local_bounds = getattr(self._data, "local_bounds", None)  # ShareData's; test doubles may lack it
        for topic in topics:
            for p in partition_ids(self._gc.cluster, topic):
                tp = (topic, p)
                try:
                    sp = await self._share_partition(g, tp, changed)
                except BrokerError as e:  # a leaderless partition: the others still serve
                    log.debug("share group %s: %s-%d not readable now: %s", g.name, topic, p, e)
                    unreadable.add(tp)
                    continue
                if sp is None or sp.room() <= 0:
                    continue
                bounds = local_bounds(tp) if local_bounds is not None else None
                if bounds is not None and bounds[1] <= sp.end_offset and bounds[0] <= sp.start_offset:
                    continue  # a local log with nothing new (and no retention past the window): no read
                wants[tp] = sp.end_offset
        if not wants:
            return unreadable
        ttls = {t: await self._data.message_ttl_ms(t) for t in {tp[0] for tp in wants}}
        for tp, result in (await self._data.read_many(wants, READ_CHUNK_BYTES)).items():
            try:
                if isinstance(result, BrokerError):
                    raise result
                self._take_read(g, tp, wants[tp], result, changed, ttls[tp[0]])
            except OffsetOutOfRangeError:
                await self._skip_to_log_start(g, tp, changed)
            except BrokerError as e:
                log.debug("share group %s: %s-%d not readable now: %s", g.name, tp[0], tp[1], e)
                unreadable.add(tp)
        return unreadable

    async def _share_partition(self, g: ShareGroup, tp: TopicPartition,
                               changed: set[TopicPartition]) -> SharePartition | None:
        """The group's state of `tp`, created at the group's start position the first time."""
        sp = g.partitions.get(tp)
        if sp is None:
            start, hw = await self._data.bounds(tp)
            if tp in g.partitions:  # another fetch created it meanwhile
                return None
            sp = g.partitions[tp] = SharePartition(g.settings, hw if g.settings.auto_offset_reset == "latest" else start)
            changed.add(tp)
        return sp

    async def _skip_to_log_start(self, g: ShareGroup, tp: TopicPartition, changed: set[TopicPartition]) -> None:
        start, _ = await self._data.bounds(tp)
        sp = g.partitions.get(tp)
        if sp is not None and start > sp.end_offset:
            sp.skip_to(start)
            changed.add(tp)

    def _take_read(self, g: ShareGroup, tp: TopicPartition, offset: int, result: ReadResult,
                   changed: set[TopicPartition], ttl_ms: int) -> None:
        """The batches read from `offset` join the window (those that fit)."""
        sp = g.partitions.get(tp)
        if sp is None:
            return
        if result.log_start_offset > sp.start_offset:
            sp.skip_to(result.log_start_offset)
            changed.add(tp)
        if sp.end_offset != offset:
            return  # another fetch read this range meanwhile
        data = result.data
        record_filter = self._record_filter(g.settings.filter)
        budget = FILTER_RECORDS_PER_READ if record_filter is None or record_filter.fast else CELPY_FILTER_RECORDS_PER_READ
        for h, pos in iter_batches(data):
            limit = sp.start_offset + sp.settings.max_in_flight_records - 1  # the window's last offset
            if h.base_offset > limit or budget <= 0:
                break
            if h.next_offset <= sp.end_offset:
                continue
            # a batch that does not fit is taken in part: the rest is read again once records settle
            _add_batch(sp, data, pos, h, min(h.last_offset, limit), tp, ttl_ms, self.clock.now_ms(), record_filter)
            if record_filter is not None:
                budget -= h.record_count

    def _record_filter(self, expression: str) -> RecordFilter | None:
        """The group's filter compiled (once per expression; bounded cache), None for none."""
        if not expression:
            return None
        compiled = self._filters.get(expression)
        if compiled is None:
            from logbroker.group.record_filter import compile_filter  # cel-python: filtered groups only

            if len(self._filters) >= FILTER_CACHE_SIZE:
                self._filters.clear()
            compiled = self._filters[expression] = compile_filter(expression)
        return compiled

    async def _priority_logs(self, topics: Iterable[str]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """The logs a member subscribed to `topics` reads: each topic and its priority-level topics
        (cluster/priority_levels.py), and the `priority_weights` of the topics that have any."""
        logs: list[str] = []
        weights: dict[str, tuple[int, ...]] = {}
        for topic in topics:
            logs.append(topic)
            try:
                levels = parse_levels(await self._data.topic_setting(topic, "priority_levels", "1"))
                if levels > 1:
                    weights[topic] = parse_weights(await self._data.topic_setting(topic, "priority_weights", ""), levels)
            except InvalidConfigError:
                levels = 1
            logs += [level_topic(topic, k) for k in range(levels - 1, 0, -1)]
        return logs, weights

    def _acquire(self, g: ShareGroup, member: ShareMember, max_records: int, changed: set[TopicPartition],
                 dead: Dead, unreadable: set[TopicPartition],
                 priority: tuple[set[str], dict[str, tuple[int, ...]]]) -> dict[TopicPartition, list[Acquired]]:
        """Up to `max_records` for `member`, round robin over the partitions; the priority levels of a
        topic drained highest first or by weight (group/priority_drain.py)."""
        logs, weights = priority
        tps = [tp for tp in g.partitions if tp[0] in logs and tp not in unreadable and not self._held(g, tp)]
        if not tps:
            return {}
        out: dict[TopicPartition, list[Acquired]] = {}
        now = self.clock.now_ms()
        g.cursor = (g.cursor + 1) % len(tps)
        by_topic: dict[str, dict[int, list[TopicPartition]]] = {}  # user topic -> level -> partitions
        for tp in tps[g.cursor:] + tps[: g.cursor]:
            user, level = parse_level_topic(tp[0])
            by_topic.setdefault(user, {}).setdefault(level, []).append(tp)
        left = max_records
        for user, levels in by_topic.items():
            if left <= 0:
                break
            drainer = g.drains.get(user)
            if drainer is None:
                drainer = g.drains[user] = LevelDrain()
            drainer.set_weights(weights.get(user, ()))

            def take(level: int, n: int, levels: dict[int, list[TopicPartition]] = levels) -> int:
                return self._acquire_from(g, member.member_id, levels[level], n, now, out, changed, dead)
            left -= sum(drain(drainer, levels, left, take).values())
        for runs in out.values():
            runs.sort(key=lambda r: r.first_offset)
        return out

    def _held(self, g: ShareGroup, tp: TopicPartition) -> bool:
        """A partition added by growing its topic hands out nothing until the group has settled every
        record of its parents below their split offsets (cluster/lineage.py): per-key order."""
        parents = partition_parents(self._gc.cluster, tp[0], tp[1])
        if not parents:
            return False
        settled = {p: sp.start_offset for p in parents if (sp := g.partitions.get((tp[0], p))) is not None}
        return not child_ready(parents, settled)

    def _acquire_from(self, g: ShareGroup, member_id: str, tps: list[TopicPartition], n: int, now: int,
                      out: dict[TopicPartition, list[Acquired]], changed: set[TopicPartition], dead: Dead) -> int:
        """Up to `n` records of `tps`, in turn; how many it got."""
        got = 0
        for tp in tps:
            if got >= n:
                break
            runs, expired = g.partitions[tp].acquire(member_id, n - got, now)
            if expired:
                dead += [(tp, d) for d in expired]
                changed.add(tp)
            if runs:  # not in `changed`: an acquisition alone is not written (module doc)
                out.setdefault(tp, []).extend(runs)
                got += sum(r.last_offset - r.first_offset + 1 for r in runs)
        return got

    async def _fill_records(self, resp: pb.ShareFetchResponse, g: ShareGroup, member_id: str,
                            acquired: dict[TopicPartition, list[Acquired]]) -> None:
        """The batches holding the acquired records, read before the state is persisted. A partition
        whose records cannot be read now (its leader died and no new one is known yet) hands out
        nothing: its acquisitions are undone (available again, count as before), the error is
        that partition's, and a later fetch tries again."""
        budget = RESPONSE_BYTES_MAX
        for tp, runs in acquired.items():
            out = resp.partitions.add(topic=tp[0], partition=tp[1])
            for r in runs:
                out.acquired.add(first_offset=r.first_offset, last_offset=r.last_offset, delivery_count=r.delivery_count)
            chunks: list[bytes] = []
            covered = -1  # every batch below this offset is in `chunks`
            try:
                for r in runs:  # sorted by offset; delayed records may sit far below the others
                    offset = max(r.first_offset, covered)
                    while offset <= r.last_offset and budget > 0:
                        result = await self._data.read(tp, offset, min(READ_CHUNK_BYTES, budget))
                        used = 0
                        for h, pos in iter_batches(result.data):
                            if h.base_offset > r.last_offset:
                                break
                            used = pos + h.size_bytes
                            offset = covered = h.next_offset
                        if used == 0:
                            break
                        chunks.append(result.data[:used])
                        budget -= used
            except BrokerError as e:
                sp = g.partitions.get(tp)
                if sp is not None:
                    sp.unacquire(member_id, runs)
                del out.acquired[:]
                chunks = []
                out.error_code = e.code
                out.error_message = e.message
            out.records = b"".join(chunks)

    # -- persistence and dead letters ---------------------------------------------------------------

    async def _persist(self, shard: _Shard, g: ShareGroup, changed: set[TopicPartition], dead: Dead,
                       wait: bool = True) -> None:
        """Dead letters first (awaited), then the snapshots of `changed`: written in this loop
        iteration's flush (`_mark`), awaited until replicated only if `wait`."""
        if dead:
            await self._dead_letter(g, dead)
        if not changed:
            return
        done = self._mark(shard, g, changed)
        if wait:
            await asyncio.shield(done)

    def _mark(self, shard: _Shard, g: ShareGroup, changed: set[TopicPartition]) -> asyncio.Future[None]:
        """Queue `changed` for the group's next flush, scheduled for the end of this loop iteration
        so every fetch and acknowledgement that ran in it shares one append; the flush's future
        (done once replicated, or with its error)."""
        pending = self._pending.get(id(g))
        if pending is None or pending.group is not g:
            loop = asyncio.get_running_loop()
            pending = self._pending[id(g)] = _PendingPersist(shard, g, set(), loop.create_future())
            pending.done.add_done_callback(_retrieve)
            loop.call_soon(self._flush, id(g))
        pending.changed |= changed
        return pending.done

    def _flush(self, key: int) -> None:
        """Append the snapshots of a group's changed partitions now, all of them synchronously (so
        flushes land in the order their snapshots were taken), then resolve the flush's future
        once they are replicated."""
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        waits: list[Awaitable[Any]] = []
        try:
            for batch in self._snapshot_batches(pending.group, pending.changed):
                waits.append(self._gc.append_now(pending.shard, pending.group.name, batch))
        except BaseException as e:
            for w in waits:
                _close(w)
            pending.done.set_exception(e)
            return
        if all(isinstance(w, asyncio.Future) and w.done() and w.exception() is None for w in waits):
            pending.done.set_result(None)  # replicated as they landed (append_now): no task, no loop turn
            return
        task = asyncio.ensure_future(asyncio.gather(*waits))
        task.add_done_callback(lambda t: _resolve(pending.done, t))

    def _snapshot_batches(self, g: ShareGroup, changed: set[TopicPartition]) -> list[bytes]:
        now = self.clock.now_ms()
        records: list[tuple[bytes, bytes | None]] = []
        size = 0
        batches: list[bytes] = []
        for tp in sorted(changed):
            sp = g.partitions.get(tp)
            if sp is None:
                continue
            recs = [share_partition_record(g.name, tp[0], tp[1], sp.snapshot())]
            recs += [share_deferred_record(g.name, tp[0], tp[1], chunk, body)
                     for chunk, body in sorted(sp.deferred.take_dirty().items())]
            records += recs
            size += sum(len(k) + len(v or b"") for k, v in recs)
            if size >= SNAPSHOT_BATCH_BYTES:
                batches.append(records_batch(records, now))
                records, size = [], 0
        if records:
            batches.append(records_batch(records, now))
        return batches

    async def _dead_letter(self, g: ShareGroup, dead: Dead) -> None:
        by_tp: dict[TopicPartition, list[DeadLetter]] = {}
        for tp, d in dead:
            by_tp.setdefault(tp, []).append(d)
        for tp, letters in by_tp.items():
            target = g.settings.dead_letter_topic_for(parse_level_topic(tp[0])[0])  # a level's: its topic's
            if target is None:
                log.warning("share group %s: %d records of %s-%d dropped (%s; no dead-letter topic)", g.name,
                            len(letters), tp[0], tp[1], letters[0].reason)
                continue
            try:
                await self._write_dead_letters(g, tp, target, letters)
            except Exception as e:  # logged, not retried (module doc)
                log.error("share group %s: dead-lettering %d records of %s-%d to %s failed: %s", g.name,
                          len(letters), tp[0], tp[1], target, e)

    async def _write_dead_letters(self, g: ShareGroup, tp: TopicPartition, target: str,
                                  letters: list[DeadLetter]) -> None:
        wanted = {d.offset: d for d in letters}
        now = self.clock.now_ms()
        builder = BatchBuilder(now)
        offset, last = min(wanted), max(wanted)
        while offset <= last:
            result = await self._data.read(tp, offset, READ_CHUNK_BYTES)
            moved = False
            for h, pos in iter_batches(result.data):
                if h.base_offset > last:
                    break
                for m in decode_batch(result.data, pos, h, tp[0], tp[1], offset):
                    d = wanted.get(m.offset)
                    if d is not None:
                        builder.append(now, m.key, m.value, [*m.headers, *_dlq_headers(tp, d, now)])
                offset, moved = h.next_offset, True
            if not moved:
                break
        if builder.record_count == 0:
            return
        partitions = await self._data.ensure_topic(target, tp[0])
        await self._data.append((target, tp[1] % partitions), builder.build(), DLQ_TIMEOUT_MS)
        log.info("share group %s: %d records of %s-%d dead-lettered to %s (%s)", g.name, builder.record_count,
                 tp[0], tp[1], target, letters[0].reason)

    # -- ShareAcknowledge and the background tick -----------------------------------------------------

    async def share_acknowledge(self, req: pb.ShareAcknowledgeRequest) -> pb.ShareAcknowledgeResponse:
        resp = pb.ShareAcknowledgeResponse()
        try:
            shard, g = self._shard_and_group(req.group)
            if g is None:
                raise UnknownMemberIdError(f"share group {req.group} does not exist here: join with epoch 0")
            member = g.check(req.member_id, req.member_epoch, self.clock.monotonic_ms())
            changed: set[TopicPartition] = set()
            dead: Dead = []
            frees = self._apply_acks(g, member.member_id, req.acknowledgements, resp.results, changed, dead)
            await self._persist(shard, g, changed, dead)
            if frees:
                self._wake(g.name)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S * 5)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("share groups: background tick failed")

    async def tick(self) -> None:
        """Evict silent members and give back expired locks, persisting what changed."""
        mono, now = self.clock.monotonic_ms(), self.clock.now_ms()
        for shard in self._gc.loaded_shards():
            for g in list(shard.share_groups.values()):
                gone, dead, changed = g.expire(mono, now)
                if gone:
                    log.info("share group %s: members %s left (no call for %d ms)", g.name, ", ".join(gone),
                             g.session_timeout_ms)
                if changed or dead:
                    try:
                        await self._persist(shard, g, changed, dead)
                    except BrokerError as e:
                        log.warning("share group %s: persisting expired locks failed: %s", g.name, e)
                    self._wake(g.name)

    # -- admin -------------------------------------------------------------------------------------

    async def alter(self, req: pb.AlterShareGroupRequest) -> pb.AlterShareGroupResponse:
        resp = pb.AlterShareGroupResponse()
        try:
            shard, g = self._shard_and_group(req.group)
            changes = settings_changes(req.settings)
            if g is None:
                await self._create(shard, req.group, changes)
                return resp
            settings = g.settings.updated(changes, self.limits)
            await self._gc.append_replicated(shard, g.name, records_batch(
                [share_group_record(g.name, settings.to_json())], self.clock.now_ms()))
            g.alter(settings)
            log.info("share group %s altered: %s", g.name, settings)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    def list_groups(self) -> pb.ListShareGroupsResponse:
        resp = pb.ListShareGroupsResponse()
        for shard in self._gc.loaded_shards():
            for name, g in sorted(shard.share_groups.items()):
                resp.groups.add(group=name, state="stable" if g.members else "empty", members=len(g.members))
        return resp

    async def describe(self, req: pb.DescribeShareGroupRequest) -> pb.DescribeShareGroupResponse:
        resp = pb.DescribeShareGroupResponse(group=req.group, coordinator_id=self._gc.broker_id)
        try:
            _, g = self._shard_and_group(req.group)
            if g is None:
                raise GroupIdNotFoundError(f"share group {req.group} does not exist")
            fill_settings(resp.settings, g.settings)
            for m in sorted(g.members.values(), key=lambda m: m.member_id):
                held = sum(sp.held_by(m.member_id) for sp in g.partitions.values())
                resp.members.add(member_id=m.member_id, member_epoch=m.epoch, topics=m.topics, acquired=held)
            now = self.clock.now_ms()
            for (topic, p), sp in sorted(g.partitions.items()):
                d = sp.describe(now)
                try:
                    hw = (await self._data.bounds((topic, p)))[1]
                except BrokerError:
                    hw = -1
                resp.partitions.add(topic=topic, partition=p, log_end_offset=hw, **d)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    async def purge(self, req: pb.PurgeShareGroupRequest) -> pb.PurgeShareGroupResponse:
        resp = pb.PurgeShareGroupResponse()
        try:
            shard, g = self._shard_and_group(req.group)
            if g is None:
                raise GroupIdNotFoundError(f"share group {req.group} does not exist")
            topics = set(req.topics)
            changed: set[TopicPartition] = set()
            for tp, sp in list(g.partitions.items()):
                if topics and parse_level_topic(tp[0])[0] not in topics:  # a topic's levels with it
                    continue
                _, hw = await self._data.bounds(tp)
                resp.purged += sp.purge(hw)
                changed.add(tp)
            await self._persist(shard, g, changed, [])
            log.info("share group %s purged: %d records settled", g.name, resp.purged)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp


def may_free(sp: SharePartition, ack_type: int) -> bool:
    """Whether settling records of `sp` with `ack_type` may make records available to another
    member: a release gives them back; with ordering "key" a settle lets the key's next record go;
    a full window takes more records from the log once its first ones settle. An ACCEPT, GAP,
    REJECT or RENEW in a window with room frees nothing (what it settles is nobody's to take)."""
    return ack_type == AckType.RELEASE or sp.settings.ordering == "key" or sp.room() <= 0


_DELIVER_AT_BYTES = H.DELIVER_AT_MS.encode()
_TTL_BYTES = H.TTL_MS.encode()


def _add_plain_batch(sp: SharePartition, data: bytes, pos: int, h: BatchHeader, last: int, topic_ttl_ms: int,
                     now_ms: int, record_filter: RecordFilter | None) -> bool:
    """`_add_batch` without decoding a record, for the common batch: no filter, no key ordering, no
    topic TTL, uncompressed, no offset missing (not compacted), and no record's bytes holding a
    delivery header's name (then none has one: an uncompressed record stores its header names as
    they are). Its records join as one run, after the CRC check decode_batch would make. False
    when the batch is not such a one (`_add_batch` decodes it)."""
    if (record_filter is not None or sp.settings.ordering == "key" or topic_ttl_ms >= 0 or h.compression != 0
            or h.record_count != h.last_offset_delta + 1):
        return False
    end = pos + h.size_bytes
    if data.find(_DELIVER_AT_BYTES, pos, end) >= 0 or data.find(_TTL_BYTES, pos, end) >= 0:
        return False
    check_batch(data, pos, h)
    first = max(h.base_offset, sp.end_offset)
    if first <= last:
        sp.add_records(first, last, h.max_timestamp, until_ms=0, expires_ms=0, now_ms=now_ms, keys=None)
    sp.add_gap(last)
    return True


def _add_batch(sp: SharePartition, data: bytes, pos: int, h: BatchHeader, last: int, tp: TopicPartition,
               topic_ttl_ms: int, now_ms: int, record_filter: RecordFilter | None = None) -> None:
    """The records of one batch up to `last` join the window, with the delivery time and expiry
    their headers ask for (share_headers.py; with a topic's message_ttl_ms too, the shorter TTL
    wins, as RabbitMQ's per-message and per-queue TTLs). TTL counts from when a record becomes
    deliverable: its delivery time, else its timestamp. Records are decoded here, once, as they
    enter the window (control batches are not: they hold no records to hand out). With the
    group's filter, the records it does not match join settled instead (`add_filtered`)."""
    if h.is_control:
        sp.add_gap(last)
        return
    if _add_plain_batch(sp, data, pos, h, last, topic_ttl_ms, now_ms, record_filter):
        return
    run: list[int] = []  # [first, last, until_ms, expires_ms] of the run being built
    skipped: list[int] = []  # [first, last] of the run of records the filter does not match
    keyed = sp.settings.ordering == "key"
    keys: list[int | None] | None = [] if keyed else None  # the run's key hashes (per-key FIFO)
    for m in decode_batch(data, pos, h, tp[0], tp[1], sp.end_offset):
        if m.offset > last:
            break
        if record_filter is not None and not record_filter.matches(m.key, m.headers, m.timestamp):
            if run:
                sp.add_records(run[0], run[1], h.max_timestamp, until_ms=run[2], expires_ms=run[3], now_ms=now_ms,
                               keys=keys)
                run = []
            if skipped:
                skipped[1] = m.offset
            else:
                skipped = [m.offset, m.offset]
            continue
        if skipped:
            sp.add_filtered(skipped[0], skipped[1], h.max_timestamp)
            skipped = []
        until = expires = 0
        ttl: int | None = topic_ttl_ms if topic_ttl_ms >= 0 else None
        if m.headers:
            hd = dict(m.headers)
            until = H.parse_ms(hd.get(H.DELIVER_AT_MS)) or 0
            own = H.parse_ms(hd.get(H.TTL_MS))
            if own is not None:
                ttl = own if ttl is None else min(ttl, own)
        if ttl is not None:
            expires = max(until, m.timestamp) + max(ttl, 1)
        if run and run[1] == m.offset - 1 and run[2] == until and run[3] == expires:
            run[1] = m.offset
            if keys is not None:
                keys.append(key_hash(m.key))
            continue
        if run:
            sp.add_records(run[0], run[1], h.max_timestamp, until_ms=run[2], expires_ms=run[3], now_ms=now_ms,
                           keys=keys)
        run = [m.offset, m.offset, until, expires]
        keys = [key_hash(m.key)] if keyed else None
    if run:
        sp.add_records(run[0], run[1], h.max_timestamp, until_ms=run[2], expires_ms=run[3], now_ms=now_ms,
                       keys=keys)
    if skipped:
        sp.add_filtered(skipped[0], skipped[1], h.max_timestamp)
    sp.add_gap(last)  # offsets of the batch with no record left (compaction)


@dataclass
class _PendingPersist:
    """One group's next flush: the partitions whose snapshots it writes, and its future."""

    shard: _Shard
    group: ShareGroup
    changed: set[TopicPartition]
    done: asyncio.Future[None]


def _time_up(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """A flush nobody waited for may fail (the coordinator moved): logged, not left unretrieved."""
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("share-group snapshot flush failed: %s", fut.exception())


def _resolve(done: asyncio.Future[None], task: asyncio.Future[Any]) -> None:
    if done.done():
        return
    if task.cancelled():
        done.cancel()
    elif task.exception() is not None:
        done.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        done.set_result(None)


def _close(w: Awaitable[Any]) -> None:
    close = getattr(w, "close", None)  # an unawaited coroutine: closed without a warning
    if close is not None:
        close()


def _check_member_filter(g: ShareGroup, settings: pb.ShareGroupSettings) -> None:
    """A member joins with the group's filter, or says none: the members share one window, so a
    filter is the group's (share_settings.py)."""
    if settings.HasField("filter") and settings.filter != g.settings.filter:
        current = repr(g.settings.filter) if g.settings.filter else "none"
        raise InvalidFilterError(f"share group {g.name} has filter {current}; this member asks for "
                                 f"{settings.filter!r} (the members share the group's filter: change it with "
                                 f"`logbroker queues configure {g.name} --filter EXPR`)")


def _dlq_headers(tp: TopicPartition, d: DeadLetter, now_ms: int) -> list[tuple[str, bytes | None]]:
    out: list[tuple[str, bytes | None]] = [
        (H.DLQ_TOPIC, tp[0].encode()), (H.DLQ_PARTITION, str(tp[1]).encode()), (H.DLQ_OFFSET, str(d.offset).encode()),
        (H.DLQ_DELIVERY_COUNT, str(d.delivery_count).encode()), (H.DLQ_REASON, d.reason.encode()),
        (H.DLQ_TIME_MS, str(now_ms).encode()),
    ]
    if d.reason_text:
        out.append((H.DLQ_REASON_TEXT, d.reason_text.encode()))
    return out
