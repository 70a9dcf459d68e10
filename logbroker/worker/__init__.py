"""The worker runtime: run a handler function over a consumer group, at least once.

    from logbroker.worker import Worker

    def handle(message):                      # logbroker.Message: topic, partition, offset, key, ...
        ...

    Worker(handle, group="billing", topics=["orders"], workers=4).run()

or from the shell: `logbroker worker myapp.handlers:handle --group billing --topic orders --workers 4`.

window.py   the pure core: in-flight window, per-partition ordering, contiguous commit marks
retry.py    retry policy (bounded exponential backoff)
handler.py  `module:function` references
slot.py     where a handler runs: a thread, or a child process
runtime.py  the shell: consumer, slot threads, commits, rebalance callbacks, signals, shutdown
queue_runtime.py  `--queue`: the same slots over a share group (ack / release / reject on the last attempt)
"""

from logbroker.worker.handler import HandlerSpecError, load_handler
from logbroker.worker.queue_runtime import QueueWorker, QueueWorkerStats
from logbroker.worker.retry import RetryPolicy
from logbroker.worker.runtime import HandlerFailedError, Worker, WorkerStats
from logbroker.worker.window import InFlightWindow

__all__ = [
    "HandlerFailedError",
    "HandlerSpecError",
    "InFlightWindow",
    "QueueWorker",
    "QueueWorkerStats",
    "RetryPolicy",
    "Worker",
    "WorkerStats",
    "load_handler",
]
