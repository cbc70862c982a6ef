"""NIXL backend (UCX): decode READs the KV straight from prefill's pool into its own pages.

Each worker registers its whole KV pool with a NIXL agent once. Control stays on the
ZeroMQ channel of the ZeroMQ backend: for each chunk prefill pushes a NixlPages message
(the KvChunk header, its source page ids and a ticket; on the first chunk of each send
also its agent metadata and pool layout, so a decode worker learns a prefill worker on
first contact), then KvDone or KvAbort as usual. Decode checks each chunk against the
request's reservation (`KvReceiver.claim_chunk`), READs the bytes page run by page run,
and the read's NIXL notification hands the ticket back: prefill lets go of its pages.

Why decode reads instead of prefill writing:
- Bytes land in decode's pages only when decode asks for them, after it has checked the
  chunk against the reservation; a prefill WRITE lands wherever prefill aims, checked
  only afterwards.
- Cancel stays trivially safe: a claimed chunk holds a reference on its pages until its
  read completed or failed, so the decode service frees a cancelled request's pages at
  once and they are not reused before the last byte has landed. With WRITEs decode could
  not know whether a write is still coming: it would need a fence (ABORT, then an ACK from
  prefill) before reusing the pages.
- Prefill copies nothing: it holds a reference on its source pages until decode's
  notification (or `hold_timeout_s`), and its engine thread only posts headers.
The price is one control hop before the bytes move; a chunk here is a whole send (all
layers, one read), so that hop is paid once per prefill chunk. Measured with
`loadtest/bench_kv_transfer.py`: the relay moves a 2k-token prompt's KV as fast as a bare
NIXL READ of the same descriptors.

The failure protocol is the shared one of `base.py`: decode's KV timeout and cancel,
prefill's KvAbort, sends to an unreachable decode failing as the ZeroMQ backend's do. A
read that fails fails its request; a peer killed mid-transfer fails its reads (UCX reports
the lost endpoint) and the claims give their pages back.

Neither agent runs NIXL's progress thread (it spins a core): decode's receive thread polls
its reads, and prefill polls its notifications, often while it holds pages (decode's reads
complete only as both sides progress). With an internal token the control channel is
CURVE-authenticated like the ZeroMQ backend's, so only a holder of the token learns how to
reach prefill's memory; the UCX bytes themselves are not encrypted.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from shared.kv_pool import KVPool
from shared.observability.worker_metrics import worker_metrics
from shared.transfer.auth import CurveKeys
from shared.transfer.base import ChunkClaim, KvTransferError
from shared.transfer.messages import KvAbort, KvChunk, KvDone
from shared.transfer.nixl_memory import make_agent, page_runs, pool_layout, run_descriptors
from shared.transfer.nixl_messages import (
    NixlHello,
    NixlPages,
    PoolLayout,
    decode_control,
    encode_pages,
)
from shared.transfer.zmq_transport import ZmqKvReceiver, ZmqKvSender

log = logging.getLogger(__name__)


def _agent_name(worker_id: str, role: str) -> str:
    # Unique per process: a restarted worker is a new peer with new memory.
    return f"{worker_id or 'kvrelay-' + role}-{uuid.uuid4().hex[:12]}"


def _ticket_bytes(ticket: int) -> bytes:
    return str(ticket).encode()


HELD_POLL_S = 0.0005  # notification polling while decode may be reading our pages
IDLE_POLL_S = 0.05


@dataclass
class _Hold:
    page_ids: list[int]
    deadline: float  # time.monotonic()


class NixlKvSender(ZmqKvSender):
    """Prefill side: posts chunk headers, holds the source pages until decode has read them.

    `hold_timeout_s` must exceed decode's `read_timeout_s`: pages are never given back
    while a read of them may still be running.
    """

    # All layers in one chunk: a chunk is one read, its descriptors carry the page layout,
    # and fewer control hops per send keep the relay near the raw READ (measured).
    target_chunk_bytes = 1 << 40

    def __init__(
        self,
        pool: KVPool,
        worker_id: str = "",
        send_timeout_s: float = 3.0,
        hold_timeout_s: float = 60.0,
        curve: CurveKeys | None = None,
    ) -> None:
        super().__init__(send_timeout_s, curve)
        self.pool = pool
        self._agent = make_agent(_agent_name(worker_id, "prefill"))
        self._registration = self._agent.register_memory(pool.kv)
        # Metadata taken after registration: it carries the pool's remote keys.
        self.hello = NixlHello(
            self._agent.name, self._agent.get_agent_metadata(), pool_layout(pool)
        )
        self.hold_timeout_s = hold_timeout_s
        self._held: dict[int, _Hold] = {}
        self._held_lock = threading.Lock()
        self._closing = threading.Event()
        self._wake = threading.Event()  # a hold was added: progress this agent from now on
        # The only thread that calls the agent after this constructor.
        self._thread = threading.Thread(
            target=self._release_loop, name="kv-nixl-notifs", daemon=True
        )
        self._thread.start()

    @property
    def num_held(self) -> int:
        """Chunks whose source pages wait for decode to read them."""
        return len(self._held)

    def _send_chunk_pages(
        self, endpoint: str, header: KvChunk, pool: KVPool, src_index: torch.Tensor
    ) -> int:
        if pool is not self.pool:
            raise KvTransferError("this NIXL sender registered another KV pool")
        src_pages: list[int] = src_index.tolist()
        pool.incref(src_pages)  # no copy: the pages stay as they are until decode read them
        with self._held_lock:
            # Unguessable: only the decode worker this chunk went to can hand its pages back.
            ticket = secrets.randbits(63)
            while ticket in self._held:
                ticket = secrets.randbits(63)
            self._held[ticket] = _Hold(src_pages, time.monotonic() + self.hold_timeout_s)
        self._wake.set()
        message = NixlPages(
            chunk=header,
            agent_name=self.hello.agent_name,
            src_page_ids=src_pages,
            ticket=ticket,
            hello=self.hello if header.layer_start == 0 else None,  # first chunk of a send
        )
        try:
            self._send(endpoint, [encode_pages(message)], "did not take the KV")
        except KvTransferError:
            self._release(ticket)
            raise
        layers = header.layer_end - header.layer_start
        return layers * 2 * len(src_pages) * self.hello.pool.page_bytes

    def _release(self, ticket: int) -> None:
        with self._held_lock:
            hold = self._held.pop(ticket, None)
        if hold is not None:
            self.pool.free(hold.page_ids)

    def _release_loop(self) -> None:
        # Decode's reads complete only as this side's UCX worker progresses too (measured:
        # ~30 ms more per read when polled every 50 ms), so poll often while pages are held.
        while not self._closing.is_set():
            if self._held:
                time.sleep(HELD_POLL_S)
            else:
                self._wake.wait(IDLE_POLL_S)
            self._wake.clear()
            try:
                notifs: dict[Any, list[bytes]] = self._agent.get_new_notifs()
            except Exception:  # NIXL raises its own exception types
                log.exception("NIXL notifications failed")
                continue
            for messages in notifs.values():
                for raw in messages:
                    try:
                        self._release(int(raw))
                    except ValueError:
                        log.warning("ignoring a NIXL notification that is no ticket: %r", raw)
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._held_lock:
            expired = [t for t, hold in self._held.items() if hold.deadline < now]
        for ticket in expired:
            worker_metrics().transfer.failed("send", "timeout")
            log.warning("KV pages of chunk %d never read by decode: released", ticket)
            self._release(ticket)

    def close(self) -> None:
        # Pages decode has yet to read stay registered a while (a draining worker's last
        # requests), bounded by the send timeout.
        deadline = time.monotonic() + self._send_timeout_s
        while time.monotonic() < deadline:
            with self._held_lock:
                if not self._held:
                    break
            time.sleep(0.01)
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with self._held_lock:
            tickets = list(self._held)
        for ticket in tickets:
            self._release(ticket)
        try:
            self._agent.deregister_memory(self._registration)
        except Exception:
            log.exception("NIXL deregistration failed")
        super().close()


@dataclass
class _Read:
    claim: ChunkClaim
    handle: Any  # nixl_xfer_handle
    peer: str
    ticket: int
    started: float  # time.monotonic()


class NixlKvReceiver(ZmqKvReceiver):
    """Decode side: control messages on the ZeroMQ receiver's socket, KV read with NIXL."""

    def __init__(
        self,
        pool: KVPool,
        bind_host: str,
        port: int,
        advertise_host: str,
        worker_id: str = "",
        curve: CurveKeys | None = None,
        read_timeout_s: float = 30.0,
    ) -> None:
        # Ready before the ZeroMQ receiver starts its thread (this class's _run), the only
        # thread that calls the agent from then on.
        self.read_timeout_s = read_timeout_s
        self._agent = make_agent(_agent_name(worker_id, "decode"))
        self._registration = self._agent.register_memory(pool.kv)
        self._layout = pool_layout(pool)
        self._peers: dict[str, PoolLayout] = {}
        self._reads: list[_Read] = []
        super().__init__(pool, bind_host, port, advertise_host, curve)

    @property
    def agent_name(self) -> str:
        name: str = self._agent.name
        return name

    @property
    def num_reads(self) -> int:
        """Reads posted and not yet complete."""
        return len(self._reads)

    def close(self) -> None:
        super().close()  # stops the thread: in-flight reads end with it
        try:
            self._agent.deregister_memory(self._registration)
        except Exception:
            log.exception("NIXL deregistration failed")

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._closing.is_set():
            # Reads in flight progress only when polled: no NIXL progress thread.
            if poller.poll(0 if self._reads else 50):
                while True:
                    try:
                        raw = self._socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(raw)
            if self._reads:
                self._progress()
                if self._reads:
                    time.sleep(0)  # lets the engine thread have the GIL between polls
        for read in self._reads:
            self._finish(read, "decode worker closing", abort=True)
        self._reads.clear()

    def _handle(self, raw: bytes) -> None:
        try:
            message = decode_control(raw)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("dropping a malformed KV message: %s", exc)
            return
        if isinstance(message, NixlPages):
            self._start_read(message)
        elif isinstance(message, KvDone):
            self.on_done(message)
        elif isinstance(message, KvAbort):
            self.on_abort(message)

    def _greet(self, hello: NixlHello) -> None:
        if hello.agent_name in self._peers:
            return
        try:
            name = self._agent.add_remote_agent(hello.agent_metadata)
        except Exception as exc:
            log.warning("cannot add NIXL agent %s: %s", hello.agent_name, exc)
            return
        if isinstance(name, bytes):
            name = name.decode()
        if name != hello.agent_name:
            log.warning("NIXL agent %s introduced itself as %s", name, hello.agent_name)
            return
        self._peers[name] = hello.pool
        log.info("NIXL peer %s added", name)

    def _start_read(self, message: NixlPages) -> None:
        if message.hello is not None:
            self._greet(message.hello)
        claim = self.claim_chunk(message.chunk)
        if claim is None:  # not expected (any more): prefill may let go of its pages
            self._notify(message.agent_name, message.ticket)
            return
        chunk = message.chunk
        peer = self._peers.get(message.agent_name)
        problem = self._check_source(peer, message)
        if problem is not None or peer is None:
            self.chunk_landed(claim, problem or f"unknown NIXL agent {message.agent_name}")
            self._notify(message.agent_name, message.ticket)
            return
        runs = page_runs(message.src_page_ids, chunk.dst_page_ids)
        lengths = [n for _, _, n in runs]
        local = run_descriptors(
            self._layout, [d for _, d, _ in runs], lengths, chunk.layer_start, chunk.layer_end
        )
        remote = run_descriptors(
            peer, [s for s, _, _ in runs], lengths, chunk.layer_start, chunk.layer_end
        )
        try:
            handle = self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(local, self._layout.mem_type),
                self._agent.get_xfer_descs(remote, peer.mem_type),
                message.agent_name,
                _ticket_bytes(message.ticket),  # prefill's notification: pages read
            )
            state = self._agent.transfer(handle)
        except Exception as exc:  # NIXL raises its own exception types
            self.chunk_landed(claim, f"NIXL read not posted: {exc}")
            self._notify(message.agent_name, message.ticket)
            return
        read = _Read(claim, handle, message.agent_name, message.ticket, time.monotonic())
        if state == "ERR":
            self._finish(read, "NIXL read failed")
        else:
            self._reads.append(read)

    def _check_source(self, peer: PoolLayout | None, message: NixlPages) -> str | None:
        if peer is None:
            return None
        chunk = message.chunk
        if peer.page_bytes != self._layout.page_bytes:
            return "page size differs between prefill and decode"
        if len(message.src_page_ids) != len(chunk.dst_page_ids):
            return "source and destination page counts differ"
        if not all(0 <= p < peer.num_pages for p in message.src_page_ids):
            return "source pages outside prefill's pool"
        if chunk.layer_end > peer.num_layers:
            return "layers outside prefill's pool"
        return None

    def _progress(self) -> None:
        now = time.monotonic()
        for read in list(self._reads):
            try:
                state = self._agent.check_xfer_state(read.handle)
            except Exception:
                state = "ERR"
            if state == "PROC" and now - read.started > self.read_timeout_s:
                if self._finish(read, f"NIXL read took over {self.read_timeout_s} s", abort=True):
                    self._reads.remove(read)
            elif state == "DONE":
                self._reads.remove(read)
                self._finish(read, None)
            elif state != "PROC":
                self._reads.remove(read)
                self._finish(read, "NIXL read failed")

    def _finish(self, read: _Read, error: str | None, abort: bool = False) -> bool:
        """Ends a read; False when an unfinished read could not be aborted (pages stay held)."""
        try:
            read.handle.release()  # a transfer still in progress is aborted
        except Exception as exc:
            if abort:
                log.warning("NIXL read of %s cannot be aborted yet: %s", read.peer, exc)
                return False
            log.warning("NIXL transfer handle not released: %s", exc)
        self.chunk_landed(read.claim, error)
        if error is not None:
            self._notify(read.peer, read.ticket)
        return True

    def _notify(self, peer: str, ticket: int) -> None:
        """Tells prefill it may let go of a chunk's pages that will not be read."""
        if peer not in self._peers:
            return  # unknown: its hold times out
        try:
            self._agent.send_notif(peer, _ticket_bytes(ticket))
        except Exception as exc:
            log.debug("notification to %s failed: %s", peer, exc)
