"""The executor's inbox: the results queue and the DLQ, read by background threads, taken at heartbeats.

Each queue is read by one thread per process (``shared_readers.SharedReader``), shared with the other executors
of the process that read it. The reader opens each message here (``open``: a malformed or forged one is a
``MessageError``, deleted at once) and asks each executor whether it holds the message's dispatch: a result or
dead letter for one of this executor's current dispatches is kept for the scheduler thread (``deliver``); one
for a dispatch it retired is deleted; one nobody in the process holds is released at once for its owner in
another process (or a future adopter), and deleted only when older than ``unowned_message_max_age``. A kept
message is deleted once the scheduler thread has taken it and acknowledged it at the next heartbeat, so a
scheduler that dies in between finds it again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.aws import QueueMessage, classify_dead_letter
from hybrid_router.lambda_exec.dispatch import DispatchBook, Ownership
from hybrid_router.lambda_exec.protocol import Outcome, Phase, ResultMessage
from hybrid_router.lambda_exec.results import Disposition
from hybrid_router.lambda_exec.shared_readers import PROCESS_QUEUES, SharedQueues, SharedReader

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.config import LambdaExecutorConfig

log = logging.getLogger(__name__)

RESULTS = "results"
DLQ = "dlq"


@dataclass(frozen=True)
class DeadLetter:
    """What the DLQ said about a run: Lambda gave up on its event."""

    outcome: Outcome
    detail: str
    request_id: str


@dataclass(frozen=True)
class Reads:
    """The results queue's reads so far (clock times; None before the first)."""

    # When the last receive that worked began: a message sent before then has been seen, or is held for a
    # moment by another reader, or waits behind a full batch.
    ok_at: float | None = None
    # When the last receive that worked and came back empty began: every message sent before then has been seen,
    # bar one that another reader held at that moment.
    drained_at: float | None = None


@dataclass(frozen=True)
class Received:
    """A message a reader kept for a dispatch that was current when it arrived."""

    receipt_handle: str
    dispatch_id: str
    result: ResultMessage | None = None  # from the results queue
    dead_letter: DeadLetter | None = None  # from the DLQ
    queue: str = RESULTS
    needs_ack: bool = True  # False: the reader deletes it without waiting for the scheduler
    sent_at: float | None = (
        None  # when its sender says it was sent (the result's sent_at, the event's issued_at)
    )


class Inbox:
    """The readers of one executor's queues and the messages they delivered that the scheduler has not taken."""

    def __init__(
        self,
        dispatches: DispatchBook,
        *,
        clock: Callable[[], float],
        stats_incr: Callable[[str], None],
        queues: SharedQueues | None = None,
        on_run_end: Callable[[ResultMessage], None] | None = None,
    ):
        self._dispatches = dispatches
        # Called on the reader thread when a run of a current dispatch reports its end (``standby``).
        self._on_run_end = on_run_end
        self.clock = clock
        self.stats_incr = stats_incr
        self._queues = PROCESS_QUEUES if queues is None else queues
        self._config: LambdaExecutorConfig | None = None
        self._readers: dict[str, SharedReader] = {}
        self._delivered: deque[Received] = deque()  # appended by reader threads, taken by the scheduler's
        self._acks_due: dict[str, list[str]] = {RESULTS: [], DLQ: []}

    def __len__(self) -> int:
        """How many delivered messages wait for the scheduler thread."""
        return len(self._delivered)

    # -- scheduler thread --------------------------------------------------------------------------------------

    def start(self, config: LambdaExecutorConfig, sqs: Any) -> None:
        """Join the process's reader of each queue (starting it if this executor is the first to read it).

        Raises ``LambdaConfigError`` when another executor of the process reads a queue with another secret.
        """
        self._config = config
        queues = [(RESULTS, config.results_queue_url)]
        if config.dead_letter_queue_url:
            queues.append((DLQ, config.dead_letter_queue_url))
        try:
            for queue, url in queues:
                self._readers[queue] = self._queues.join(self, queue, url, config, sqs)
        except Exception:
            self.stop(flush=False)
            raise

    def reads(self) -> Reads:
        """How far the results queue has been read: what a missing message may be taken to mean."""
        reader = self._readers.get(RESULTS)
        return Reads() if reader is None else Reads(reader.receive_ok_at, reader.drained_at)

    def wake(self, dispatch_id: str | None = None) -> None:
        """A dispatch was just registered: poll now rather than at the readers' next idle check, and show at
        once any of its messages the readers hid (an adopted dispatch's results, released while nobody held it)."""
        for reader in self._readers.values():
            reader.wake(dispatch_id)

    def take(self) -> Iterator[Received]:
        """The delivered messages, oldest first; each is acknowledged at the next ``flush_acks``."""
        while self._delivered:
            item = self._delivered.popleft()
            if item.needs_ack:
                self._acks_due[item.queue].append(item.receipt_handle)
            yield item

    def flush_acks(self) -> None:
        """Let the readers delete the messages the scheduler has taken since the last heartbeat."""
        for queue, handles in self._acks_due.items():
            if queue in self._readers:
                self._readers[queue].ack(handles)
        self._acks_due = {RESULTS: [], DLQ: []}

    def stop(self, *, flush: bool) -> None:
        """Leave the readers; with ``flush`` delete the acknowledged messages first, else leave them.

        Delivered messages the scheduler has not taken (and, without ``flush``, taken ones not acknowledged yet)
        are made visible again at once for whoever adopts their tasks. A reader stops with its last executor.
        """
        if flush:
            self.flush_acks()
        for queue, reader in self._readers.items():
            pending = [item for item in self._delivered if item.queue == queue and item.needs_ack]
            reveal = [item.receipt_handle for item in pending] + ([] if flush else self._acks_due[queue])
            self._queues.leave(reader, self, flush=flush, reveal=reveal)
        self._readers.clear()
        self._delivered.clear()
        self._acks_due = {RESULTS: [], DLQ: []}

    # -- reader threads ----------------------------------------------------------------------------------------

    def open(self, queue: str, message: QueueMessage) -> Received:
        """What a message says, checked with this executor's secret; raises ``protocol.MessageError``."""
        return self._open_result(message) if queue == RESULTS else self._open_dead_letter(message)

    def ownership(self, dispatch_id: str) -> Ownership:
        return self._dispatches.ownership(dispatch_id)

    def has_work_in_flight(self) -> bool:
        return self._dispatches.has_work_in_flight()

    def deliver(self, item: Received) -> Disposition:
        """Keep ``item`` for the scheduler thread (its dispatch is one of this executor's current ones)."""
        self._delivered.append(item)
        result = item.result
        if result is not None and result.phase is Phase.FINISHED and self._on_run_end is not None:
            try:
                self._on_run_end(result)
            except Exception:  # the message is delivered whatever happens to the next invoke
                log.exception("Could not start the next task on the end of run %s", result.run_id or "?")
        return Disposition.DELIVER if item.needs_ack else Disposition.DELIVER_AND_DELETE

    def _open_result(self, message: QueueMessage) -> Received:
        assert self._config is not None
        result = protocol.open_result(message.body, self._config.secret, now=self.clock())
        # A SUCCESS is already in Airflow's database: the task process recorded it through the execution API
        # before it exited 0. A scheduler that dies before taking this event finds the task finished (it is
        # not adopted), so the message need not wait a heartbeat for the acknowledgement. Deleting it at once
        # keeps the queue short; moto's receive (and SQS's) costs grow with the messages in flight.
        settled = result.phase is Phase.FINISHED and result.outcome is Outcome.SUCCESS
        return Received(
            receipt_handle=message.receipt_handle,
            dispatch_id=result.dispatch_id,
            result=result,
            needs_ack=not settled,
            sent_at=result.sent_at,
        )

    def _open_dead_letter(self, message: QueueMessage) -> Received:
        """A DLQ message's body is the event we sent; its attributes say what killed the run."""
        assert self._config is not None
        event = protocol.open_event(message.body, self._config.secret)
        code = message.attributes.get("ErrorCode", "")
        text = message.attributes.get("ErrorMessage", "")
        detail = protocol.scrub(
            f"{text} (ErrorCode {code})" if code else text or "dead-lettered by Lambda", 500
        )
        return Received(
            receipt_handle=message.receipt_handle,
            dispatch_id=event.dispatch_id,
            dead_letter=DeadLetter(
                classify_dead_letter(code, text), detail, message.attributes.get("RequestID", "")
            ),
            queue=DLQ,
            sent_at=event.issued_at,
        )

    def malformed(self, queue: str, message: QueueMessage, exc: Exception) -> None:
        # Deleted right after this, so each bad message is logged once. The body may hold a token: never log it.
        log.warning(
            "Deleting a %s message %s that changes no task: %s",
            queue,
            message.message_id,
            protocol.scrub(str(exc)),
        )
        self.stats_incr("malformed_message")
