"""A prefill worker's side of the index: announces its blocks and load from a thread.

The engine calls `blocks_stored` / `blocks_removed` / `set_load`; those only append to a
queue and wake the thread, so the hot path never waits on Redis. The thread writes what
has queued up in one round trip, beats the liveness key (TTL) with the worker's load, and
repairs whatever may have been lost with a full re-announce (a set difference against the
worker's own snapshot) when it starts, when Redis lost its keys (restart, failover, or the
liveness key expired and a janitor reaped the entries), after a failed write, and
periodically.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from shared.prefix_index.schema import DEFAULT_KEY_PREFIX, IndexKeys, WorkerStatus
from shared.prefix_index.writer import BlockEvent, IndexWriter

log = logging.getLogger("kvrelay.prefix_index")

Snapshot = Callable[[], list[bytes]]


@dataclass
class PublisherStats:
    hashes_written: int = 0
    reannounces: int = 0
    write_errors: int = 0
    dropped_events: int = 0


class PrefixIndexPublisher:
    def __init__(
        self,
        redis_url: str,
        worker_id: str,
        grpc_address: str,
        *,
        liveness_ttl_s: float = 10.0,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        reannounce_interval_s: float = 60.0,
        load_interval_s: float = 0.05,
        max_pending_hashes: int = 1 << 20,
        socket_timeout_s: float = 5.0,
    ) -> None:
        self.worker_id = worker_id
        self.grpc_address = grpc_address
        self.stats = PublisherStats()
        self._ttl_ms = max(1, round(liveness_ttl_s * 1000))
        self._beat_interval_s = liveness_ttl_s / 3
        self._reannounce_interval_s = reannounce_interval_s
        self._load_interval_s = load_interval_s
        self._max_pending = max_pending_hashes
        self._writer = IndexWriter(
            redis.Redis.from_url(
                redis_url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=min(socket_timeout_s, 2.0),
                health_check_interval=30,
            ),
            IndexKeys(key_prefix),
        )
        self._status = WorkerStatus(
            worker_id=worker_id,
            address=grpc_address,
            started_at=time.time(),
            instance=uuid.uuid4().hex,
        )
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        # Guarded by _lock:
        self._pending: list[BlockEvent] = []
        self._pending_hashes = 0
        self._enqueued = 0  # events queued so far (a sequence number)
        self._published = 0  # events up to this number are reflected in Redis
        self._snapshot: Snapshot | None = None
        self._load_dirty = False
        # Owned by the thread:
        self._slot: int | None = None
        self._needs_full = True  # a new process must clear what an earlier one announced
        self._fresh_process = True
        self._connected = False
        self._next_beat = 0.0
        self._last_beat = 0.0
        self._next_reannounce = 0.0

    # --- called by the worker (any thread; never blocks on Redis) ---

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"prefix-index-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def blocks_stored(self, hashes: Sequence[bytes]) -> None:
        self._enqueue(BlockEvent(True, list(hashes)))

    def blocks_removed(self, hashes: Sequence[bytes]) -> None:
        self._enqueue(BlockEvent(False, list(hashes)))

    def set_load(self, queued_tokens: int, kv_used_pages: int, kv_total_pages: int) -> None:
        with self._lock:
            self._status = WorkerStatus(
                worker_id=self.worker_id,
                address=self.grpc_address,
                queued_tokens=queued_tokens,
                kv_used_pages=kv_used_pages,
                kv_total_pages=kv_total_pages,
                started_at=self._status.started_at,
                instance=self._status.instance,
            )
            self._load_dirty = True
        self._wake.set()

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Everything the worker holds, for re-announces (called from the publisher thread)."""
        with self._lock:
            self._snapshot = snapshot

    def request_reannounce(self) -> None:
        with self._lock:
            self._needs_full = True
        self._wake.set()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until every event queued so far is in Redis; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._progress:
            target = self._enqueued
            self._wake.set()
            while self._published < target or self._slot is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._closing.is_set():
                    return False
                self._progress.wait(min(left, 0.05))
                self._wake.set()
        return True

    @property
    def connected(self) -> bool:
        return self._connected

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the thread; the worker leaves the index (best effort, bounded)."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._writer.client.close()

    # --- the publisher thread ---

    def _enqueue(self, event: BlockEvent) -> None:
        if not event.hashes:
            return
        with self._lock:
            self._enqueued += 1
            self._pending.append(event)
            self._pending_hashes += len(event.hashes)
            if self._pending_hashes > self._max_pending and self._snapshot is not None:
                # Redis has been away for long: a full re-announce will say it all at once.
                self.stats.dropped_events += len(self._pending)
                self._pending.clear()
                self._pending_hashes = 0
                self._needs_full = True
        self._wake.set()

    def _run(self) -> None:
        backoff = 0.1
        while not self._closing.is_set():
            try:
                self._step()
                if not self._connected:
                    log.info("prefix index: %s connected to Redis", self.worker_id)
                self._connected = True
                backoff = 0.1
            except (redis.RedisError, OSError) as exc:
                self.stats.write_errors += 1
                if self._connected or self.stats.write_errors == 1:
                    log.warning(
                        "prefix index: Redis unreachable for %s (%s); will re-announce",
                        self.worker_id,
                        exc,
                    )
                self._connected = False
                self._needs_full = True
                self._closing.wait(backoff)
                # Retry well within the liveness TTL, so that a short outage is not a death.
                backoff = min(backoff * 2, 5.0, self._beat_interval_s)
                continue
            self._wake.wait(self._sleep_time())
            self._wake.clear()
        self._leave()

    def _sleep_time(self) -> float:
        now = time.monotonic()
        deadlines = [self._next_beat, self._next_reannounce]
        if self._load_dirty:
            deadlines.append(self._last_beat + self._load_interval_s)
        return max(0.0, min(deadlines) - now)

    def _step(self) -> None:
        now = time.monotonic()
        load_due = self._load_dirty and now >= self._last_beat + self._load_interval_s
        if self._slot is None or now >= self._next_beat or load_due:
            self._beat()
        if now >= self._next_reannounce:
            self._needs_full = True
        if self._needs_full:
            self._reannounce()
        self._write_pending()

    def _beat(self) -> None:
        with self._lock:
            status = self._status
            self._load_dirty = False
        status = dataclasses.replace(status, updated_at=time.time())
        beat = self._writer.heartbeat(status, self._ttl_ms)
        now = time.monotonic()
        self._last_beat = now
        self._next_beat = now + self._beat_interval_s
        if beat.previous_instance and beat.previous_instance != status.instance and beat.was_live:
            log.warning("prefix index: another live process announces worker id %s", self.worker_id)
        if self._slot != beat.slot or not beat.was_live:
            # Our entries may be gone (Redis restarted, or we were reaped while away).
            self._needs_full = True
        self._slot = beat.slot

    def _reannounce(self) -> None:
        assert self._slot is not None
        discarded: list[BlockEvent] = []
        covered = 0
        with self._lock:
            snapshot = self._snapshot
            if snapshot is not None:
                # The snapshot, taken after this point, covers every event queued before it.
                discarded, self._pending = self._pending, []
                self._pending_hashes = 0
                covered = self._enqueued
        if snapshot is None and not self._fresh_process:
            # Nothing to re-announce from: the queued events are all we can repair with.
            self._needs_full = False
            self._next_reannounce = time.monotonic() + self._reannounce_interval_s
            return
        held = snapshot() if snapshot is not None else []
        try:
            added, removed = self._writer.reconcile(self._slot, held)
        except BaseException:
            if snapshot is not None:
                with self._lock:
                    self._pending[:0] = discarded  # a later re-announce takes a new snapshot
                    self._pending_hashes += sum(len(e.hashes) for e in discarded)
            raise
        self._needs_full = False
        self._fresh_process = False
        self._next_reannounce = time.monotonic() + self._reannounce_interval_s
        self.stats.reannounces += 1
        if added or removed:
            log.info(
                "prefix index: %s re-announced %d blocks (+%d, -%d)",
                self.worker_id,
                len(held),
                added,
                removed,
            )
        if snapshot is not None:
            with self._progress:
                self._published = max(self._published, covered)
                self._progress.notify_all()

    def _write_pending(self) -> None:
        assert self._slot is not None
        with self._lock:
            events, self._pending = self._pending, []
            self._pending_hashes = 0
            upto = self._enqueued
        if events:
            try:
                self.stats.hashes_written += self._writer.apply(self._slot, events)
            except BaseException:
                with self._lock:
                    self._pending[:0] = events  # in order, ahead of newer events
                    self._pending_hashes += sum(len(e.hashes) for e in events)
                raise
        with self._progress:
            self._published = max(self._published, upto)
            self._progress.notify_all()

    def _leave(self) -> None:
        if self._slot is None or not self._connected:
            return
        try:
            self._writer.leave(self._slot)
            self._writer.reap_all(max_rounds=20)
        except (redis.RedisError, OSError) as exc:
            log.info("prefix index: %s could not leave cleanly: %s", self.worker_id, exc)
