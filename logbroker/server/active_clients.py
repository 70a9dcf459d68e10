"""Active producers and consumers per topic: distinct clients seen in the last minute.

Fed by the request layer (server/apis/produce_fetch.py: Produce and Fetch; server/apis/queues.py:
ShareFetch) with `seen(kind, topic, client)` — O(1) per topic of a request — and read by the
`/metrics` scrape (server/cluster_metrics.py) with `counts(kind)`: per topic, how many distinct
clients were seen in the last `window_ms`.

A client is its client id, or its principal when it sent none (`client_key`). Follower fetches
(brokers) are not counted.

State: per kind, an LRU of topics, each an LRU of client → last seen (monotonic ms, from the
injected clock). `seen` moves the client to the young end; `counts` drops clients older than the
window from the old end (amortised O(1) each) and topics left empty.

Bounds (cardinality of `logbroker_topic_active_{producers,consumers}{topic}`, and memory):
at most `max_topics` topics per kind (the topic seen least recently is forgotten first) and at most
`max_clients_per_topic` clients per topic (the client seen least recently is forgotten: the
count saturates at the bound). Pure: no I/O; time only from the clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from logbroker.clock import Clock
from logbroker.server.request_context import RequestContext

PRODUCERS = "producers"
CONSUMERS = "consumers"
KINDS = (PRODUCERS, CONSUMERS)
WINDOW_MS = 60_000
MAX_TOPICS = 10_000
MAX_CLIENTS_PER_TOPIC = 10_000


def client_key(client_id: str, principal: str) -> str:
    """Who a request is from, for counting: its client id, else its principal."""
    return client_id or f"principal:{principal}"


def seen_by(active: ActiveClients, kind: str, context: RequestContext, topics: Iterable[str]) -> None:
    """The request layer's call: the caller of one request touched `topics` as `kind`."""
    client = client_key(context.client_id, context.principal)
    for topic in topics:
        active.seen(kind, topic, client)


class ActiveClients:
    def __init__(self, clock: Clock, window_ms: int = WINDOW_MS, max_topics: int = MAX_TOPICS,
                 max_clients_per_topic: int = MAX_CLIENTS_PER_TOPIC) -> None:
        if window_ms <= 0 or max_topics <= 0 or max_clients_per_topic <= 0:
            raise ValueError("window_ms, max_topics and max_clients_per_topic must be positive")
        self._clock = clock
        self.window_ms = window_ms
        self.max_topics = max_topics
        self.max_clients_per_topic = max_clients_per_topic
        self._by_kind: dict[str, OrderedDict[str, OrderedDict[str, int]]] = {k: OrderedDict() for k in KINDS}

    def seen(self, kind: str, topic: str, client: str) -> None:
        """`client` produced to (PRODUCERS) or consumed from (CONSUMERS) `topic` now."""
        topics = self._by_kind[kind]
        clients = topics.get(topic)
        if clients is None:
            if len(topics) >= self.max_topics:
                topics.popitem(last=False)
            clients = topics[topic] = OrderedDict()
        else:
            topics.move_to_end(topic)
        clients[client] = self._clock.monotonic_ms()
        clients.move_to_end(client)
        if len(clients) > self.max_clients_per_topic:
            clients.popitem(last=False)

    def counts(self, kind: str) -> dict[str, int]:
        """Per topic, the distinct clients seen within the window (topics with none left out)."""
        cutoff = self._clock.monotonic_ms() - self.window_ms
        topics = self._by_kind[kind]
        out: dict[str, int] = {}
        for topic in list(topics):
            clients = topics[topic]
            while clients and next(iter(clients.values())) <= cutoff:
                clients.popitem(last=False)
            if clients:
                out[topic] = len(clients)
            else:
                del topics[topic]
        return out
