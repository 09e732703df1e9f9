"""One reader per SQS queue in a process, shared by the executors that read it, routing messages by owner.

Several LambdaExecutors may read one queue: a router's ``lambda`` and ``lambda_10g`` children, and the same
executors in every scheduler of an HA deployment (replicas with one configuration). A message belongs to the
executor that holds its dispatch. In one process the shared reader hands it to that executor in memory: no SQS
round trip, no delay. A message no executor of the process holds (another scheduler's, or one a survivor will
adopt from a dead scheduler) is released at once, so its owner gets it at its next receive; one released again
and again is hidden a little longer each time (``results.release_delay_s``), and the reader remembers it, so
that adopting its dispatch here makes it visible again at once. Nobody deletes a message it does not own, except
one older than ``unowned_message_max_age``: its run's owner could no longer adopt it.

Executors that share a queue must share ``signing_secret`` (each would take the other's messages for forgeries):
``SharedQueues.join`` refuses a second secret on a queue with a ``LambdaConfigError``. Executors whose settings
reach a queue differently (another endpoint, region or connection) get readers of their own, which hand
messages over through SQS as separate processes do.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from hybrid_router.lambda_exec import protocol
from hybrid_router.lambda_exec.aws import QueueMessage
from hybrid_router.lambda_exec.config import LambdaConfigError
from hybrid_router.lambda_exec.dispatch import Ownership
from hybrid_router.lambda_exec.results import Disposition, QueueReader, release_delay_s

if TYPE_CHECKING:
    from hybrid_router.lambda_exec.config import LambdaExecutorConfig
    from hybrid_router.lambda_exec.inbox import Received

log = logging.getLogger(__name__)

# How many dispatches a reader remembers hidden messages for (to show them at once when one is adopted here).
HIDDEN_DISPATCHES_KEPT = 10_000


class Member(Protocol):
    """What a shared reader needs of each executor reading its queue (``inbox.Inbox``)."""

    clock: Callable[[], float]
    stats_incr: Callable[[str], None]

    def open(self, queue: str, message: QueueMessage) -> Received: ...

    def malformed(self, queue: str, message: QueueMessage, exc: Exception) -> None: ...

    def ownership(self, dispatch_id: str) -> Ownership: ...

    def deliver(self, item: Received) -> Disposition: ...

    def has_work_in_flight(self) -> bool: ...


class SharedReader:
    """The reader of one queue for every member executor of this process; see the module docstring."""

    def __init__(
        self, key: tuple[str, ...], queue: str, url: str, config: LambdaExecutorConfig, sqs: Any, clock
    ):
        self.key = key
        self.queue = queue
        self.url = url
        self._secret = protocol.normalise_secret(config.signing_secret)
        self._owner_name = config.function_name
        self._clock = clock
        self._members: tuple[Member, ...] = ()  # replaced, never mutated: the reader thread reads a snapshot
        self._clients: dict[int, Any] = {}
        self._max_age_s: dict[int, int] = {}
        self._sqs = sqs
        self._lock = threading.Lock()
        self._hidden: OrderedDict[str, list[str]] = OrderedDict()  # dispatch id -> receipt handles
        self._reader = QueueReader(
            name=f"lambda-{queue}-{config.function_name}",
            sqs=sqs,
            queue_url=url,
            classify=self._classify,
            is_active=self._is_active,
            wait_seconds=config.poll_wait_seconds,
            max_sightings=config.stale_after_sightings,
            clock=clock,
        )

    # -- membership (scheduler threads, under the registry's lock) -------------------------------------------

    def add(self, member: Member, config: LambdaExecutorConfig, sqs: Any) -> None:
        if protocol.normalise_secret(config.signing_secret) != self._secret:
            option = "results_queue_url" if self.queue == "results" else "dead_letter_queue_url"
            raise LambdaConfigError(
                f"[lambda_executor] {option} {self.url!r} is already read in this process by the executor of "
                f"function {self._owner_name!r}, with another signing_secret: executors that share a queue "
                "must share the secret (each would delete the other's messages as forged). Give this "
                f"executor the same secret, or a queue of its own in its options ({option}: ...)."
            )
        self._members = (*self._members, member)
        self._clients[id(member)] = sqs
        self._max_age_s[id(member)] = config.unowned_message_max_age

    def remove(self, member: Member) -> bool:
        """Take ``member`` out; True when it was the last one."""
        self._members = tuple(m for m in self._members if m is not member)
        sqs = self._clients.pop(id(member), None)
        self._max_age_s.pop(id(member), None)
        if self._clients and sqs is self._sqs:
            # Its client may be closed when that executor starts again: go on with a member's that stays.
            self._sqs = next(iter(self._clients.values()))
            self._reader.use_client(self._sqs)
        return not self._members

    # -- control (scheduler threads) -------------------------------------------------------------------------

    def start(self) -> None:
        self._reader.start()

    def stop(self, *, flush: bool) -> None:
        self._reader.stop(flush=flush)

    def ack(self, receipt_handles: list[str]) -> None:
        self._reader.ack(receipt_handles)

    def reveal(self, receipt_handles: list[str]) -> None:
        self._reader.reveal(receipt_handles)

    def wake(self, dispatch_id: str | None = None) -> None:
        """Poll now; for a dispatch just registered here (adopted), show at once what this reader hid for it."""
        if dispatch_id is not None:
            with self._lock:
                handles = self._hidden.pop(dispatch_id, None)
            if handles:
                self._reader.reveal(handles)
        self._reader.wake()

    @property
    def receive_ok_at(self) -> float | None:
        return self._reader.receive_ok_at

    @property
    def drained_at(self) -> float | None:
        return self._reader.drained_at

    @property
    def alive(self) -> bool:
        return self._reader.alive

    # -- the reader thread -----------------------------------------------------------------------------------

    def _is_active(self) -> bool:
        return any(member.has_work_in_flight() for member in self._members)

    def _classify(self, message: QueueMessage) -> Disposition:
        members = self._members
        if not members:
            return Disposition.RELEASE
        try:
            item = members[0].open(self.queue, message)
        except protocol.MessageError as exc:
            members[0].malformed(self.queue, message, exc)
            return Disposition.DELETE
        retired = False
        for member in members:
            ownership = member.ownership(item.dispatch_id)
            if ownership is Ownership.CURRENT:
                return member.deliver(item)
            retired = retired or ownership is Ownership.RETIRED
        if retired:
            log.debug("Deleting a %s message for finished dispatch %s", self.queue, item.dispatch_id)
            return Disposition.DELETE
        return self._unowned(message, item, members[0])

    def _unowned(self, message: QueueMessage, item: Received, first: Member) -> Disposition:
        """No executor of this process holds the dispatch: leave it for its owner, unless it has none left."""
        sent_at = message.sent_at or item.sent_at
        max_age_s = max(self._max_age_s.values(), default=0)
        if sent_at is not None and max_age_s and self._clock() - sent_at > max_age_s:
            log.warning(
                "Deleting %s message %s for dispatch %s: nobody claimed it in %.0f s (unowned_message_max_age)",
                self.queue,
                message.message_id,
                item.dispatch_id,
                self._clock() - sent_at,
            )
            first.stats_incr("stale_message")
            return Disposition.DELETE
        if release_delay_s(message.receive_count) > 0:
            with self._lock:
                self._hidden.setdefault(item.dispatch_id, []).append(message.receipt_handle)
                self._hidden.move_to_end(item.dispatch_id)
                while len(self._hidden) > HIDDEN_DISPATCHES_KEPT:
                    self._hidden.popitem(last=False)
        return Disposition.RELEASE


class SharedQueues:
    """The shared readers of one process, by queue and the settings that reach it.

    ``LambdaExecutor`` uses ``PROCESS_QUEUES`` unless it is given its own (tests model two schedulers so). A
    reader is created by the first executor that joins and stopped when the last one leaves: nothing stays
    behind for tests to reset.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: dict[tuple[str, ...], SharedReader] = {}

    def join(
        self, member: Member, queue: str, url: str, config: LambdaExecutorConfig, sqs: Any
    ) -> SharedReader:
        key = (queue, url, config.sqs_endpoint_url, config.region_name, config.aws_conn_id)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                reader.add(member, config, sqs)
                return reader
            reader = SharedReader(key, queue, url, config, sqs, member.clock)
            reader.add(member, config, sqs)
            reader.start()
            self._readers[key] = reader
            return reader

    def leave(self, reader: SharedReader, member: Member, *, flush: bool, reveal: list[str]) -> None:
        """Take ``member`` off ``reader``; make ``reveal`` (its deliveries not taken) visible to others at once."""
        with self._lock:
            last = reader.remove(member)
            if last and self._readers.get(reader.key) is reader:
                del self._readers[reader.key]
        reader.reveal(reveal)
        if last:
            reader.stop(flush=flush)

    def __len__(self) -> int:
        return len(self._readers)


PROCESS_QUEUES = SharedQueues()
