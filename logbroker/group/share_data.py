"""How a share-group coordinator reaches the records of the partitions its groups read, and writes
dead letters: from its own replica when it leads the partition (a zero-copy read of the log, an
append through the replica manager), else from the partition's leader over the Broker service (a
consumer Fetch, a Produce with acks=all), as any client would. Topics it needs (dead-letter topics)
are created on demand like `__consumer_offsets`.

`read_many` reads several partitions at once, as a waiting ShareFetch does on every tick: one Fetch
per remote leader carries all the partitions that leader leads (at most FETCH_PARTITIONS_MAX per
request), and every partition gets its own result or error (a dead or moved leader fails only its
partitions, and the next call asks the leader the cluster view then names).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from logbroker.cluster.cluster_view import ClusterView
from logbroker.errors import (
    BrokerError,
    CoordinatorNotAvailableError,
    LeaderNotAvailableError,
    TopicAlreadyExistsError,
    error_for,
)
from logbroker.v1 import logbroker_pb2 as pb

T = TypeVar("T")

if TYPE_CHECKING:
    from logbroker.group.coordinator import OffsetsLog, OffsetsTopicCreator, PeerBrokers

TopicPartition = tuple[str, int]
REMOTE_TIMEOUT_S = 5.0
TOPIC_READY_WAIT_S = 10.0
TOPIC_CONFIG_CACHE_S = 5.0
TopicConfigs = Callable[[str], Awaitable[dict[str, str]]]
FETCH_PARTITIONS_MAX = 64  # partitions in one remote Fetch of `read_many`


@dataclass(frozen=True)
class ReadResult:
    data: bytes            # whole record batches (possibly none)
    log_start_offset: int
    high_watermark: int


class ShareDataSource(Protocol):
    async def bounds(self, tp: TopicPartition) -> tuple[int, int]: ...

    async def read(self, tp: TopicPartition, offset: int, max_bytes: int) -> ReadResult: ...

    async def append(self, tp: TopicPartition, batch: bytes, timeout_ms: int) -> None: ...

    async def read_many(self, offsets: dict[TopicPartition, int],
                        max_bytes: int) -> dict[TopicPartition, ReadResult | BrokerError]: ...

    async def ensure_topic(self, name: str, like: str) -> int: ...

    async def message_ttl_ms(self, topic: str) -> int: ...

    async def topic_setting(self, topic: str, name: str, default: str) -> str: ...


class ShareData:
    """`ShareDataSource` on a broker (see the module doc)."""

    def __init__(self, cluster: ClusterView, replicas: OffsetsLog, peers: PeerBrokers | None,
                 topics: OffsetsTopicCreator, topic_config: TopicConfigs | None = None) -> None:
        self._cluster = cluster
        self._replicas = replicas
        self._peers = peers
        self._topics = topics
        self._topic_config = topic_config
        self._config_cache: dict[str, tuple[float, dict[str, str]]] = {}  # topic -> (read at, its config)
        self._create_lock = asyncio.Lock()

    def data_arrival(self, keys: list[tuple[str, int]], timeout_s: float) -> Awaitable[bool] | None:
        """An awaitable that is True once a local replica of one of `keys` is appended to (False after
        `timeout_s`); None when the replicas have no fetch purgatory (remote leaders: the tick)."""
        purgatory = getattr(self._replicas, "fetch_purgatory", None)
        return None if purgatory is None or not keys else purgatory.wait(keys, timeout_s)

    def data_watch(self, keys: list[tuple[str, int]], on_notify: Callable[[], None] | None = None,
                   ) -> tuple[asyncio.Future[bool], Callable[[], None]] | None:
        """`data_arrival` registered at once (Purgatory.watch): a future set True by an append to a
        local replica of one of `keys` (and `on_notify` called then, within the append), and the
        function that ends the watch; None without a purgatory (remote leaders: the tick) or when
        it is full."""
        purgatory = getattr(self._replicas, "fetch_purgatory", None)
        return None if purgatory is None or not keys else purgatory.watch(keys, on_notify)

    def arrival_watch(self, keys: list[tuple[str, int]], on_arrival: Callable[[], None],
                      waiting: Callable[[], bool]) -> Callable[[], None] | None:
        """`data_watch` that stays armed: on each append to one of `keys` it calls `on_arrival()`,
        then watches again while `waiting()` (a waiting ShareFetch that was not the one woken must
        hear the next append too, not only its next tick). `on_arrival` runs within the append
        (Purgatory.watch's on_notify), not a loop iteration later: the fetch it wakes resumes in
        the next iteration. Returns the function that ends it (call it once); None without a
        purgatory or when it is full."""
        current: list[Callable[[], None]] = []  # the end() of the watch armed now, if any

        def arm() -> bool:
            watched = self.data_watch(keys, fired)
            if watched is None:
                return False
            current.append(watched[1])
            return True

        def fired() -> None:
            if not current:
                return  # ended meanwhile
            current.pop()()
            on_arrival()
            if waiting():
                arm()

        def finish() -> None:
            if current:
                current.pop()()

        return finish if arm() else None

    async def message_ttl_ms(self, topic: str) -> int:
        """The topic's `message_ttl_ms` (-1: none), cached (see `topic_setting`)."""
        return int(await self.topic_setting(topic, "message_ttl_ms", "-1"))

    async def topic_setting(self, topic: str, name: str, default: str) -> str:
        """One config of a topic (`default` when unset or unknown), the config cached for
        TOPIC_CONFIG_CACHE_S (a change applies within seconds); the cached value (or `default`)
        while the metadata store cannot be read."""
        now = time.monotonic()
        cached = self._config_cache.get(topic)
        if cached is None or now - cached[0] >= TOPIC_CONFIG_CACHE_S:
            config = cached[1] if cached is not None else {}
            if self._topic_config is not None:
                try:
                    config = await self._topic_config(topic)
                except Exception:  # metadata store unreachable: the last known config until the next read
                    pass
            if len(self._config_cache) > 10_000:
                self._config_cache.clear()
            cached = self._config_cache[topic] = (now, config)
        return cached[1].get(name, default)

    def _local(self, tp: TopicPartition):  # type: ignore[no-untyped-def]
        part = self._replicas.partitions.get(tp)
        return part if part is not None and part.is_leader else None

    def _leader_stub(self, tp: TopicPartition):  # type: ignore[no-untyped-def]
        return self._peers_stub(self._leader_address(tp))

    def _peers_stub(self, address: str):  # type: ignore[no-untyped-def]
        assert self._peers is not None  # _leader_address checked it
        return self._peers.broker_stub(address)

    def _leader_address(self, tp: TopicPartition) -> str:
        states = self._cluster.topic_partitions(tp[0]) or {}
        st = states.get(tp[1])
        if st is None:
            raise error_for(pb.UNKNOWN_TOPIC_OR_PARTITION, f"{tp[0]}-{tp[1]} does not exist")
        brokers, _, _ = self._cluster.cluster_brokers()
        address = next((f"{b.host}:{b.port}" for b in brokers if b.broker_id == st.leader), None)
        if address is None or self._peers is None:
            raise LeaderNotAvailableError(f"{tp[0]}-{tp[1]} has no live leader (leader {st.leader})")
        return address

    async def bounds(self, tp: TopicPartition) -> tuple[int, int]:
        """(log start offset, high watermark)."""
        part = self._local(tp)
        if part is not None:
            return part.log.log_start_offset, part.high_watermark
        # ListOffsets, not a Fetch at some offset: a fetch below the log start (retention moved it)
        # fails with OFFSET_OUT_OF_RANGE instead of answering the bounds
        req = pb.ListOffsetsRequest(partitions=[pb.ListOffsetsPartition(topic=tp[0], partition=tp[1], timestamp=ts)
                                                for ts in (-2, -1)])
        resp = await self._at_leader(tp, lambda stub: stub.ListOffsets(req, timeout=REMOTE_TIMEOUT_S))
        for r in resp.results:
            if r.error_code != pb.NONE:
                raise error_for(r.error_code, r.error_message)
        if len(resp.results) != 2:
            raise LeaderNotAvailableError(f"the leader of {tp[0]}-{tp[1]} answered {len(resp.results)} offsets, not 2")
        return resp.results[0].offset, resp.results[1].offset

    async def _at_leader(self, tp: TopicPartition, call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(stub)` on the partition leader's Broker stub; a gRPC failure (the leader unreachable
        right now) is LEADER_NOT_AVAILABLE, a BrokerError (no leader known) stays itself."""
        try:
            return await call(self._leader_stub(tp))
        except BrokerError:
            raise
        except Exception as exc:  # grpc errors: the leader is unreachable right now
            raise LeaderNotAvailableError(f"cannot reach the leader of {tp[0]}-{tp[1]}: {exc}") from None

    def local_bounds(self, tp: TopicPartition) -> tuple[int, int] | None:
        """(log start offset, high watermark) of a partition this broker leads, None for another:
        no call, so the share coordinator can tell which local partitions have anything new."""
        part = self._local(tp)
        return None if part is None else (part.log.log_start_offset, part.high_watermark)

    async def read(self, tp: TopicPartition, offset: int, max_bytes: int) -> ReadResult:
        """Whole batches from the one holding `offset` (at least one unless there is none), up to
        the high watermark. OFFSET_OUT_OF_RANGE below the log start (the caller skips ahead)."""
        part = self._local(tp)
        if part is not None:
            plog = part.log
            hw = part.high_watermark
            if offset >= hw:
                return ReadResult(b"", plog.log_start_offset, hw)
            view = part.read_for_consumer(offset, max_bytes)
            try:
                return ReadResult(bytes(view), plog.log_start_offset, hw)
            finally:
                view.release()
        req = pb.FetchRequest(max_wait_ms=0, min_bytes=0, max_bytes=max(max_bytes, 1), partitions=[
            pb.FetchPartition(topic=tp[0], partition=tp[1], fetch_offset=offset,
                              partition_max_bytes=max(max_bytes, 1), current_leader_epoch=-1)])
        resp = await self._at_leader(tp, lambda stub: stub.Fetch(req, timeout=REMOTE_TIMEOUT_S))
        r = resp.results[0]
        if r.error_code != pb.NONE:
            raise error_for(r.error_code, r.error_message)
        return ReadResult(bytes(r.records) if max_bytes > 0 else b"", r.log_start_offset, r.high_watermark)

    async def read_many(self, offsets: dict[TopicPartition, int],
                        max_bytes: int) -> dict[TopicPartition, ReadResult | BrokerError]:
        """`read` of each partition from its offset (up to `max_bytes` each), the remote ones
        batched per leader (module doc); an error per partition instead of raising."""
        out: dict[TopicPartition, ReadResult | BrokerError] = {}
        by_leader: dict[str, list[TopicPartition]] = {}
        for tp, offset in offsets.items():
            try:
                if self._local(tp) is not None:
                    out[tp] = await self.read(tp, offset, max_bytes)
                else:
                    by_leader.setdefault(self._leader_address(tp), []).append(tp)
            except BrokerError as e:
                out[tp] = e
        calls = [self._fetch_from(address, tps[i:i + FETCH_PARTITIONS_MAX], offsets, max_bytes)
                 for address, tps in by_leader.items() for i in range(0, len(tps), FETCH_PARTITIONS_MAX)]
        for part in await asyncio.gather(*calls):
            out.update(part)
        return out

    async def _fetch_from(self, address: str, tps: list[TopicPartition], offsets: dict[TopicPartition, int],
                          max_bytes: int) -> dict[TopicPartition, ReadResult | BrokerError]:
        """One Fetch of `tps` at the leader `address`: a result or an error per partition."""
        each = max(max_bytes, 1)
        req = pb.FetchRequest(max_wait_ms=0, min_bytes=0, max_bytes=each * len(tps), partitions=[
            pb.FetchPartition(topic=t, partition=p, fetch_offset=offsets[(t, p)], partition_max_bytes=each,
                              current_leader_epoch=-1) for t, p in tps])
        try:
            resp = await self._peers_stub(address).Fetch(req, timeout=REMOTE_TIMEOUT_S)
        except Exception as exc:  # grpc errors: the leader is unreachable right now
            err = LeaderNotAvailableError(f"cannot reach the leader {address}: {exc}")
            return {tp: err for tp in tps}
        out: dict[TopicPartition, ReadResult | BrokerError] = {
            tp: LeaderNotAvailableError(f"the leader {address} did not answer for {tp[0]}-{tp[1]}") for tp in tps}
        for r in resp.results:
            tp = (r.topic, r.partition)
            if tp not in out:
                continue
            if r.error_code != pb.NONE:
                out[tp] = error_for(r.error_code, r.error_message)
            else:
                out[tp] = ReadResult(bytes(r.records) if max_bytes > 0 else b"", r.log_start_offset, r.high_watermark)
        return out

    async def append(self, tp: TopicPartition, batch: bytes, timeout_ms: int) -> None:
        """Append with acks=all to the partition's leader; returns once replicated."""
        if self._local(tp) is not None:
            append = self._replicas.append_records(tp[0], tp[1], batch, acks=-1)
            await self._replicas.wait_for_acks(tp[0], tp[1], append, timeout_ms)
            return
        req = pb.ProduceRequest(acks=-1, timeout_ms=timeout_ms, partitions=[
            pb.ProducePartition(topic=tp[0], partition=tp[1], records=batch)])
        try:
            resp = await self._leader_stub(tp).Produce(req, timeout=timeout_ms / 1000 + REMOTE_TIMEOUT_S)
        except BrokerError:
            raise
        except Exception as exc:
            raise LeaderNotAvailableError(f"cannot reach the leader of {tp[0]}-{tp[1]}: {exc}") from None
        r = resp.results[0]
        if r.error_code != pb.NONE:
            raise error_for(r.error_code, r.error_message)

    async def ensure_topic(self, name: str, like: str) -> int:
        """The partition count of topic `name`, created first (with `like`'s partition count and
        replication factor) if it does not exist; waits until every partition has a leader."""
        states = self._cluster.topic_partitions(name)
        if not states:
            like_states = self._cluster.topic_partitions(like) or {}
            partitions = max(1, len(like_states))
            rf = max(1, len(next(iter(like_states.values())).replicas) if like_states else 1)
            async with self._create_lock:
                if not self._cluster.topic_partitions(name):
                    try:
                        await self._topics.create_topic(name, partitions, rf, {})
                    except TopicAlreadyExistsError:
                        pass
        deadline = time.monotonic() + TOPIC_READY_WAIT_S
        while True:
            states = self._cluster.topic_partitions(name)
            if states and all(st.leader >= 0 for st in states.values()):
                return len(states)
            if time.monotonic() > deadline:
                raise CoordinatorNotAvailableError(f"topic {name} has no leaders yet")
            await asyncio.sleep(0.05)
