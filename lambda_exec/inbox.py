"""The executor's inbox: the results queue and the DLQ, read by background threads, taken at heartbeats.

A reader thread per queue (``results.QueueReader``) hands each message to a ``classify_*`` method here: a result
or dead letter for one of the executor's current dispatches is kept for the scheduler thread; one for a retired
dispatch, a malformed or forged one, or one nobody claimed for ``stale_after_sightings`` receives is deleted; any
other is left in the queue for the executor that owns (or will adopt) its dispatch. A kept message is deleted
once the scheduler thread has taken it and acknowledged it at the next heartbeat, so a scheduler that dies in
between finds it again.
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
from hybrid_router.lambda_exec.results import Disposition, QueueReader

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
class Received:
    """A message a reader kept for a dispatch that was current when it arrived."""

    receipt_handle: str
    dispatch_id: str
    result: ResultMessage | None = None  # from the results queue
    dead_letter: DeadLetter | None = None  # from the DLQ
    queue: str = RESULTS
    needs_ack: bool = True  # False: the reader deletes it without waiting for the scheduler


class Inbox:
    """The readers of one executor's queues and the messages they delivered that the scheduler has not taken."""

    def __init__(
        self, dispatches: DispatchBook, *, clock: Callable[[], float], stats_incr: Callable[[str], None]
    ):
        self._dispatches = dispatches
        self._clock = clock
        self._stats_incr = stats_incr
        self._config: LambdaExecutorConfig | None = None
        self._readers: dict[str, QueueReader] = {}
        self._delivered: deque[Received] = deque()  # appended by reader threads, taken by the scheduler's
        self._acks_due: dict[str, list[str]] = {RESULTS: [], DLQ: []}

    def __len__(self) -> int:
        """How many delivered messages wait for the scheduler thread."""
        return len(self._delivered)

    # -- scheduler thread --------------------------------------------------------------------------------------

    def start(self, config: LambdaExecutorConfig, sqs: Any) -> None:
        self._config = config
        self._readers[RESULTS] = self._reader(config, sqs, RESULTS, config.results_queue_url)
        if config.dead_letter_queue_url:
            self._readers[DLQ] = self._reader(config, sqs, DLQ, config.dead_letter_queue_url)
        for reader in self._readers.values():
            reader.start()

    def _reader(self, config: LambdaExecutorConfig, sqs: Any, queue: str, url: str) -> QueueReader:
        return QueueReader(
            name=f"lambda-{queue}-{config.function_name}",
            sqs=sqs,
            queue_url=url,
            classify=self.classify_result if queue == RESULTS else self.classify_dead_letter,
            is_active=self._dispatches.has_work_in_flight,
            wait_seconds=config.poll_wait_seconds,
            release_visibility_s=config.unowned_visibility_timeout,
            max_sightings=config.stale_after_sightings,
        )

    def wake(self) -> None:
        """A dispatch was just registered: poll now rather than at the readers' next idle check."""
        for reader in self._readers.values():
            reader.wake()

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
        """Stop the readers; with ``flush`` delete the acknowledged messages first, else leave them."""
        if flush:
            self.flush_acks()
        for reader in self._readers.values():
            reader.stop(flush=flush)
        self._readers.clear()

    # -- reader threads ----------------------------------------------------------------------------------------

    def classify_result(self, message: QueueMessage) -> Disposition:
        """Check a results-queue message and keep it if its dispatch is current."""
        assert self._config is not None
        try:
            result = protocol.open_result(message.body, self._config.secret, now=self._clock())
        except protocol.MessageError as exc:
            self._malformed(RESULTS, message, exc)
            return Disposition.DELETE
        # A SUCCESS is already in Airflow's database: the task process recorded it through the execution API
        # before it exited 0. A scheduler that dies before taking this event finds the task finished (it is
        # not adopted), so the message need not wait a heartbeat for the acknowledgement. Deleting it at once
        # keeps the queue short; moto's receive (and SQS's) costs grow with the messages in flight.
        settled = result.phase is Phase.FINISHED and result.outcome is Outcome.SUCCESS
        item = Received(
            receipt_handle=message.receipt_handle,
            dispatch_id=result.dispatch_id,
            result=result,
            needs_ack=not settled,
        )
        return self._classify_by_ownership(message, item)

    def classify_dead_letter(self, message: QueueMessage) -> Disposition:
        """A DLQ message's body is the event we sent; its attributes say what killed the run."""
        assert self._config is not None
        try:
            event = protocol.open_event(message.body, self._config.secret)
        except protocol.MessageError as exc:
            self._malformed(DLQ, message, exc)
            return Disposition.DELETE
        code = message.attributes.get("ErrorCode", "")
        text = message.attributes.get("ErrorMessage", "")
        detail = protocol.scrub(
            f"{text} (ErrorCode {code})" if code else text or "dead-lettered by Lambda", 500
        )
        item = Received(
            receipt_handle=message.receipt_handle,
            dispatch_id=event.dispatch_id,
            dead_letter=DeadLetter(
                classify_dead_letter(code, text), detail, message.attributes.get("RequestID", "")
            ),
            queue=DLQ,
        )
        return self._classify_by_ownership(message, item)

    def _classify_by_ownership(self, message: QueueMessage, item: Received) -> Disposition:
        assert self._config is not None
        ownership = self._dispatches.ownership(item.dispatch_id)
        if ownership is Ownership.CURRENT:
            self._delivered.append(item)
            return Disposition.DELIVER if item.needs_ack else Disposition.DELIVER_AND_DELETE
        if ownership is Ownership.RETIRED:
            log.debug("Deleting a %s message for finished dispatch %s", item.queue, item.dispatch_id)
            return Disposition.DELETE
        if message.receive_count >= self._config.stale_after_sightings:
            log.warning(
                "Deleting %s message %s for dispatch %s: no executor claimed it in %d receives",
                item.queue,
                message.message_id,
                item.dispatch_id,
                message.receive_count,
            )
            self._stats_incr("stale_message")
            return Disposition.DELETE
        return Disposition.RELEASE

    def _malformed(self, queue: str, message: QueueMessage, exc: Exception) -> None:
        # Deleted right after this, so each bad message is logged once. The body may hold a token: never log it.
        log.warning(
            "Deleting a %s message %s that changes no task: %s",
            queue,
            message.message_id,
            protocol.scrub(str(exc)),
        )
        self._stats_incr("malformed_message")
