"""A background reader of one SQS queue (results or dead letters): long polling, batch receive, batch delete.

The reader makes every SQS call on its queue (through ``aws``), so the scheduler loop never waits on SQS. For
each message it asks its ``classify`` callback what to do:

- ``DELIVER``: the message is for a dispatch this executor owns; the callback has handed it to the executor.
  It is deleted only when the executor acknowledges it (``ack``), one heartbeat later, after the scheduler has
  taken the event: a scheduler that dies in between finds the message again once it becomes visible.
- ``DELIVER_AND_DELETE``: handed to the executor and deleted in the next batch, without waiting for an
  acknowledgement: the executor decided no restarted scheduler needs the message (see ``LambdaExecutor``).
- ``DELETE``: malformed, forged, superseded or stale; deleted in the next batch.
- ``RELEASE``: for a dispatch another executor (or a future adopter) owns: made visible again at once, so its
  owner gets it at its next receive. A message released again and again (its owner is gone and nobody adopted
  its task yet) is hidden a little longer each time, by its own receive count (``release_delay_s``): a live
  owner never waits, and an orphan costs few calls.

A malformed message is a ``MessageError`` that ``classify`` answers with ``DELETE``. Should ``classify`` raise
anything else (a bug), the message is released, its traceback logged once, and it is deleted once it has been
received ``max_sightings`` times: no message circulates forever. A delete that fails (expired credentials, an
SQS outage) is tried again with the next one, so that no message is classified (and logged) twice for it.

When the reader stops, the delivered messages not acknowledged yet are made visible again at once (visibility
timeout 0): the executor that adopts their tasks reads them without waiting out ``OWNED_VISIBILITY_TIMEOUT_S``.
``reveal`` does the same for chosen messages while the reader goes on (an executor leaving a shared reader, or
adopting a dispatch whose message the reader hid).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import Enum
from queue import Empty, SimpleQueue
from typing import Any

from hybrid_router.lambda_exec import aws
from hybrid_router.lambda_exec.aws import QueueMessage

log = logging.getLogger(__name__)

# How long a received message we own stays hidden before another receive can see it again: well above the
# time between receiving it and acknowledging it one heartbeat later.
OWNED_VISIBILITY_TIMEOUT_S = 120
# How often an idle reader (no dispatch in flight) checks whether it has work again.
IDLE_CHECK_S = 0.5
ERROR_PAUSE_S = 1.0
# After a receive that came back with less than a full batch, let the queue fill for this long before the next
# receive. Results trickle in one by one while many tasks run: without the pause each receive (and each
# delete batch) carries one or two messages, doubling the SQS calls per task. The executor applies messages only
# at its heartbeat (every second or so), so this adds no visible latency.
GATHER_S = 0.1
# How many ids of messages that ``classify`` failed on a reader remembers, to log each traceback once.
FAILED_IDS_KEPT = 1000
# How many receipt handles of failed deletes a reader keeps to try again (a receive's worth each second for the
# owned visibility timeout); past that the oldest are dropped: their messages are received, and deleted, again.
DELETES_DUE_KEPT = 10 * OWNED_VISIBILITY_TIMEOUT_S
# A released message is visible again at once for its first receives; from then on it is hidden 1, 2, 4...
# seconds, up to the cap. Live readers hand a message over within a receive or two (a message picked by a
# reader that is not its owner ten times running, at even odds, is one in a thousand); one whose owner is gone
# costs a receive every RELEASE_DELAY_CAP_S per reader after its first ten, not a hot loop.
FREE_RELEASES = 10
RELEASE_DELAY_CAP_S = 20


def release_delay_s(receive_count: int, cap_s: int = RELEASE_DELAY_CAP_S) -> int:
    """How long a message received ``receive_count`` times is hidden when released: 0, then growing to ``cap_s``."""
    if receive_count <= FREE_RELEASES:
        return 0
    return min(cap_s, 2 ** min(receive_count - FREE_RELEASES - 1, 16))


class Disposition(str, Enum):
    DELIVER = "deliver"
    DELIVER_AND_DELETE = "deliver_and_delete"
    DELETE = "delete"
    RELEASE = "release"


class QueueReader:
    """One thread long-polling one queue; see the module docstring."""

    def __init__(
        self,
        *,
        name: str,
        sqs: Any,
        queue_url: str,
        classify: Callable[[QueueMessage], Disposition],
        is_active: Callable[[], bool],
        wait_seconds: int,
        max_sightings: int,
        max_release_delay_s: int = RELEASE_DELAY_CAP_S,
        gather_s: float = GATHER_S,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self._sqs = sqs
        self._queue_url = queue_url
        self._classify = classify
        self._is_active = is_active
        self._wait_seconds = wait_seconds
        self._max_release_delay_s = max_release_delay_s
        self._max_sightings = max_sightings
        self._gather_s = gather_s
        self._failed_ids: OrderedDict[str, None] = OrderedDict()  # reader thread only
        self._acks: SimpleQueue[str] = SimpleQueue()
        self._reveals: SimpleQueue[str] = SimpleQueue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flush_on_stop = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        # Receipt handles delivered and not acknowledged yet; touched by the reader thread only.
        self._unacked: set[str] = set()
        # Receipt handles whose delete failed, tried again with the next one; reader thread only.
        self._deletes_due: list[str] = []
        self.received = 0
        self._clock = clock
        # When the last receive that worked began (``clock`` time), its messages classified: the executor's
        # watchdog infers nothing from a missing message until a receive that began after its deadline worked.
        self.receive_ok_at: float | None = None
        # When the last receive that worked and came back empty began. A receive returns at most a batch, so only
        # an empty one says that every message sent before it has been received (long polling queries every
        # SQS server); a run's silence is read against this one (``liveness``).
        self.drained_at: float | None = None

    # -- control (scheduler thread) --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def ack(self, receipt_handles: list[str]) -> None:
        """Delete these delivered messages at the reader's next batch."""
        for handle in receipt_handles:
            self._acks.put(handle)
        if receipt_handles:
            self._wake.set()

    def reveal(self, receipt_handles: list[str]) -> None:
        """Make these messages visible again at the reader's next batch (delivered ones are no longer awaited)."""
        for handle in receipt_handles:
            self._reveals.put(handle)
        if receipt_handles:
            self._wake.set()

    def use_client(self, sqs: Any) -> None:
        """Make the next calls with this client (the one in use belongs to an executor that left)."""
        self._sqs = sqs

    def wake(self) -> None:
        """Start polling now instead of at the next idle check (a dispatch was just registered)."""
        self._wake.set()

    def stop(self, *, flush: bool = True, timeout: float | None = None) -> None:
        """Stop the thread; with ``flush`` delete the acknowledged messages first."""
        self._flush_on_stop = flush
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout if timeout is not None else self._wait_seconds + 10)
        if self._thread.is_alive():
            log.warning("%s did not stop within its long-poll wait; it is a daemon thread", self.name)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._delete(self._drain_acks())
                self._show(self._drain_reveals())
                if not self._is_active():
                    self._wake.wait(IDLE_CHECK_S)
                    self._wake.clear()
                    continue
                received, released = self._poll_once()
                # A full batch of other executors' messages is no backlog of ours: pausing lets their owners
                # (polling too) take them rather than this reader again.
                if 0 < received < aws.SQS_BATCH_MAX or (received and released == received):
                    self._stop.wait(self._gather_s)
            except Exception:
                # The thread must outlive any single failure (network, throttling, a bug in one message).
                log.exception("%s: reading %s failed; retrying", self.name, self._queue_url)
                self._stop.wait(ERROR_PAUSE_S)
        try:
            acked = self._drain_acks()
            if self._flush_on_stop:
                self._delete(acked)
            else:
                self._unacked.update(acked)
            # Not (or not known to be) taken by the scheduler: whoever adopts the task reads these now.
            self._show(sorted(self._unacked | set(self._drain_reveals())))
        except Exception:
            log.exception("%s: could not settle delivered messages at stop", self.name)

    def _poll_once(self) -> tuple[int, int]:
        """One receive (a long poll) and the deletes that ride along; how many messages came and were released."""
        began = self._clock()
        messages = aws.receive_messages(
            self._sqs,
            self._queue_url,
            wait_seconds=self._wait_seconds,
            visibility_timeout=OWNED_VISIBILITY_TIMEOUT_S,
        )
        self.received += len(messages)
        to_delete: list[str] = []
        to_release: dict[str, int] = {}
        for message in messages:
            try:
                disposition = self._classify(message)
            except Exception:
                disposition = self._unhandled(message)
            if disposition is Disposition.DELIVER:
                self._unacked.add(message.receipt_handle)
            elif disposition in (Disposition.DELETE, Disposition.DELIVER_AND_DELETE):
                to_delete.append(message.receipt_handle)
            elif disposition is Disposition.RELEASE:
                to_release[message.receipt_handle] = release_delay_s(
                    message.receive_count, self._max_release_delay_s
                )
        # Deletes of messages delivered in earlier batches ride along with this batch's.
        self.receive_ok_at = began  # every message of this receive is classified (a kept one is delivered)
        if not messages:
            self.drained_at = began
        try:
            self._delete(to_delete + self._drain_acks())
        finally:
            # Even when the deletes failed: a released message's owner must not wait for the visibility timeout.
            self._release(to_release)
        return len(messages), len(to_release)

    def _unhandled(self, message: QueueMessage) -> Disposition:
        """``classify`` raised on this message: leave it for a while, but not forever."""
        if message.message_id not in self._failed_ids:
            log.exception("%s: could not handle message %s; leaving it", self.name, message.message_id)
            self._failed_ids[message.message_id] = None
            if len(self._failed_ids) > FAILED_IDS_KEPT:
                self._failed_ids.popitem(last=False)
        if message.receive_count >= self._max_sightings:
            log.warning(
                "%s: deleting message %s: it could not be handled in %d receives",
                self.name,
                message.message_id,
                message.receive_count,
            )
            self._failed_ids.pop(message.message_id, None)
            return Disposition.DELETE
        return Disposition.RELEASE

    def _drain_acks(self) -> list[str]:
        handles = []
        while True:
            try:
                handle = self._acks.get_nowait()
            except Empty:
                return handles
            self._unacked.discard(handle)
            handles.append(handle)

    def _delete(self, handles: list[str]) -> None:
        # A delete that fails (expired credentials, an SQS outage) is tried again with the next one: a receipt
        # handle stays valid while its message is hidden. Dropped, the message would come back after the owned
        # visibility timeout, to be classified (a malformed one logged) again.
        handles, self._deletes_due = self._deletes_due + handles, []
        try:
            failures = aws.delete_messages(self._sqs, self._queue_url, handles)
        except Exception:
            self._deletes_due = handles[-DELETES_DUE_KEPT:]
            raise
        for failure in failures:
            log.warning("%s: could not delete a message: %s", self.name, failure)

    def _drain_reveals(self) -> list[str]:
        handles = []
        while True:
            try:
                handle = self._reveals.get_nowait()
            except Empty:
                return handles
            self._unacked.discard(handle)
            handles.append(handle)

    def _show(self, handles: list[str]) -> None:
        self._release(dict.fromkeys(handles, 0))

    def _release(self, timeouts: dict[str, int]) -> None:
        # A failure is harmless: the message was deleted or received by another reader meanwhile, or it becomes
        # visible at its receive's visibility timeout.
        for failure in aws.change_visibility_each(self._sqs, self._queue_url, timeouts):
            log.debug("%s: could not release a message: %s", self.name, failure)
