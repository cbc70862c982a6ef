"""KV relay throughput between two processes, next to the raw transports it runs on.

    python -m loadtest.bench_kv_transfer [--tokens 2048] [--repeats 10] [--out result.json]

The KV of one prompt of `--tokens` tokens in the default model's geometry (30 layers,
3 KV heads of 64, float32, pages of 16 tokens: 46 KiB per token) goes from this process
(the prefill side) to a child process (the decode side) by each path, in one run:

- relay: kvrelay's own sender and receiver (`shared/transfer`), from `send_pages` to the
  decode side's arrival future, over ZeroMQ tcp, ZeroMQ ipc and NIXL (UCX). NIXL twice:
  with the pages consecutive on both sides (as fresh pools hand them out) and scattered.
- raw: the same bytes without kvrelay: pyzmq zero-copy PUSH/PULL over tcp and ipc in the
  ZeroMQ relay's chunk sizes, one NIXL READ between two registered buffers, and memcpy
  (torch `copy_`) in one process.

Rounds interleave the paths, so a change of load on a shared machine hits all of them.
The decode side signals arrival over a pipe; both sides' control hops are in every
figure. Throughput is the KV's bytes over the median time (and the best).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from rich.console import Console
from rich.table import Table

from shared.kv_pool import KVPool
from shared.transfer.base import KvReceiver, KvSender
from shared.transfer.nixl_memory import make_agent, page_runs, pool_layout, run_descriptors
from shared.transfer.nixl_transport import NixlKvReceiver, NixlKvSender
from shared.transfer.zmq_transport import ZmqKvReceiver, ZmqKvSender

PAGE_SIZE = 16
RELAYS = ("zmq-tcp", "zmq-ipc", "nixl", "nixl-scattered")
RAWS = ("raw-zmq-tcp", "raw-zmq-ipc", "raw-nixl", "raw-nixl-scattered")
RAW_OF = {
    "zmq-tcp": "raw-zmq-tcp",
    "zmq-ipc": "raw-zmq-ipc",
    "nixl": "raw-nixl",
    "nixl-scattered": "raw-nixl-scattered",
}


@dataclass(frozen=True)
class Row:
    path: str
    kind: str  # "relay", "raw" or "memcpy"
    num_bytes: int
    median_ms: float
    best_ms: float
    median_gb_s: float
    best_gb_s: float
    of_raw: float | None  # relay's median throughput over its raw transport's


def default_model_pool(num_pages: int) -> KVPool:
    """A float32 pool of the default model's geometry: 30 layers, 3 KV heads of 64."""
    return KVPool(30, 3, 64, num_pages, PAGE_SIZE)


class IpcKvReceiver(ZmqKvReceiver):
    """kvrelay's ZeroMQ receive loop (`_run`, the protocol) on a socket bound to an ipc://
    path: ZmqKvReceiver itself binds a TCP port."""

    def __init__(self, pool: KVPool, path: str) -> None:
        KvReceiver.__init__(self, pool)
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._endpoint = f"ipc://{path}"
        self._socket.bind(self._endpoint)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
        self._socket.close()


# ---- the decode side: a child process answering commands over a pipe ---------------------


def decode_side(conn: Connection, num_pages: int, ipc_dir: str, num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    pools = {name: default_model_pool(num_pages) for name in RELAYS}
    for pool in pools.values():
        pool.allocate(pool.num_pages)  # every page reserved, as decode reserves a request's
    receivers: dict[str, KvReceiver] = {
        "zmq-tcp": ZmqKvReceiver(pools["zmq-tcp"], "127.0.0.1", 0, "127.0.0.1"),
        "zmq-ipc": IpcKvReceiver(pools["zmq-ipc"], f"{ipc_dir}/relay"),
        "nixl": NixlKvReceiver(pools["nixl"], "127.0.0.1", 0, "127.0.0.1"),
        "nixl-scattered": NixlKvReceiver(pools["nixl-scattered"], "127.0.0.1", 0, "127.0.0.1"),
    }
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw_sockets = {"raw-zmq-tcp": context.socket(zmq.PULL), "raw-zmq-ipc": context.socket(zmq.PULL)}
    tcp_port = raw_sockets["raw-zmq-tcp"].bind_to_random_port("tcp://127.0.0.1")
    raw_endpoints = {
        "raw-zmq-tcp": f"tcp://127.0.0.1:{tcp_port}",
        "raw-zmq-ipc": f"ipc://{ipc_dir}/raw",
    }
    raw_sockets["raw-zmq-ipc"].bind(raw_endpoints["raw-zmq-ipc"])
    # Raw NIXL: decode reads with the relay's own descriptors, into a pool of its own.
    agent = make_agent(f"bench-decode-{uuid.uuid4().hex[:8]}")
    landing = default_model_pool(num_pages)
    agent.register_memory(landing.kv)
    conn.send(
        {
            "endpoints": {name: r.endpoint for name, r in receivers.items()},
            "raw_endpoints": raw_endpoints,
            "landing": pool_layout(landing),
        }
    )
    peer = ""
    while True:
        command, *args = conn.recv()
        if command == "stop":
            break
        if command == "peer":
            peer = agent.add_remote_agent(args[0])
            peer = peer.decode() if isinstance(peer, bytes) else peer
            conn.send("ok")
        elif command == "expect":
            name, request_id, pages = args
            future = receivers[name].expect(request_id, pages)
            conn.send("ok")
            future.result(timeout=60)
            receivers[name].cancel(request_id)
            conn.send("arrived")
        elif command == "raw-zmq":
            name, num_frames = args
            conn.send("ok")
            for _ in range(num_frames):
                raw_sockets[name].recv(copy=False)
            conn.send("arrived")
        elif command == "raw-nixl":
            src_rows, dst_rows = args
            handle = agent.initialize_xfer(
                "READ",
                agent.get_xfer_descs(dst_rows, "DRAM"),
                agent.get_xfer_descs(src_rows, "DRAM"),
                peer,
            )
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            handle.release()
            conn.send("arrived" if state == "DONE" else f"failed: {state}")
    for receiver in receivers.values():
        receiver.close()
    for socket in raw_sockets.values():
        socket.close()


# ---- the prefill side: this process ----------------------------------------------------


def pages_of(pool: KVPool, count: int, scattered: bool, seed: int) -> list[int]:
    if not scattered:
        return list(range(count))
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(pool.num_pages, generator=generator)[:count].tolist()


def run(tokens: int, repeats: int, warmup: int, num_threads: int) -> list[Row]:
    torch.set_num_threads(num_threads)
    num_pages = -(-tokens // PAGE_SIZE)
    pool_pages = num_pages * 2  # room to scatter the pages
    src_pool = default_model_pool(pool_pages)
    src_pool.kv.copy_(torch.randn(src_pool.kv.shape, generator=torch.Generator().manual_seed(0)))
    src_pool.allocate(src_pool.num_pages)  # every page computed, as a prefill's would be
    kv_bytes = num_pages * src_pool.page_bytes()
    # The relay's own chunking (KvSender.target_chunk_bytes), used by the raw paths too.
    layer_bytes = src_pool.page_bytes() // src_pool.num_layers * num_pages
    layers_per_chunk = max(1, KvSender.target_chunk_bytes // layer_bytes)
    chunk_bytes = layer_bytes * layers_per_chunk
    num_chunks = -(-kv_bytes // chunk_bytes)
    raw_pool = default_model_pool(pool_pages)  # the raw paths' source: a pool, not kvrelay's
    raw_pool.kv.normal_(generator=torch.Generator().manual_seed(1))
    raw = raw_pool.kv.view(-1)[: kv_bytes // 4]
    raw_chunks: list[Any] = [  # numpy views: ZeroMQ sends them without a copy
        raw.view(torch.uint8)[i : i + chunk_bytes].numpy() for i in range(0, kv_bytes, chunk_bytes)
    ]

    ipc_dir = tempfile.mkdtemp(prefix="kvrelay-bench-")
    parent, child = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(
        target=decode_side, args=(child, pool_pages, ipc_dir, num_threads), daemon=True
    )
    process.start()
    setup = parent.recv()
    zmq_sender = ZmqKvSender()
    nixl_sender = NixlKvSender(src_pool, "bench-prefill")
    agent = make_agent(f"bench-prefill-raw-{uuid.uuid4().hex[:8]}")
    agent.register_memory(raw_pool.kv)
    parent.send(("peer", agent.get_agent_metadata()))
    assert parent.recv() == "ok"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw_push = {}
    for name, endpoint in setup["raw_endpoints"].items():
        raw_push[name] = context.socket(zmq.PUSH)
        raw_push[name].connect(endpoint)
    raw_layout = pool_layout(raw_pool)

    def relay(name: str, round_index: int) -> Callable[[], None]:
        sender: KvSender = nixl_sender if name.startswith("nixl") else zmq_sender
        scattered = name == "nixl-scattered"
        src = pages_of(src_pool, num_pages, scattered, round_index)
        dst = pages_of(src_pool, num_pages, scattered, 1000 + round_index)
        request_id = uuid.uuid4().hex
        parent.send(("expect", name, request_id, dst))
        assert parent.recv() == "ok"

        def go() -> None:
            endpoint = setup["endpoints"][name]
            _, chunks = sender.send_pages(
                request_id=request_id,
                endpoint=endpoint,
                pool=src_pool,
                src_page_ids=src,
                dst_page_ids=dst,
            )
            sender.send_done(
                request_id=request_id,
                endpoint=endpoint,
                num_tokens=tokens,
                num_chunks=chunks,
                first_token_ids=[0],
                first_token_logprobs=[0.0],
            )
            assert parent.recv() == "arrived"

        return go

    def raw_zmq(name: str) -> Callable[[], None]:
        parent.send(("raw-zmq", name, num_chunks))
        assert parent.recv() == "ok"

        def go() -> None:
            for block in raw_chunks:
                raw_push[name].send(block, 0, copy=False)
            assert parent.recv() == "arrived"

        return go

    def raw_nixl(scattered: bool, round_index: int) -> Callable[[], None]:
        src = pages_of(src_pool, num_pages, scattered, round_index)
        dst = pages_of(src_pool, num_pages, scattered, 1000 + round_index)
        runs = page_runs(src, dst)
        lengths = [n for _, _, n in runs]
        layers = src_pool.num_layers
        src_rows = run_descriptors(raw_layout, [r[0] for r in runs], lengths, 0, layers)
        dst_rows = run_descriptors(setup["landing"], [r[1] for r in runs], lengths, 0, layers)
        return lambda: read_raw(src_rows, dst_rows)

    def read_raw(src_rows: np.ndarray, dst_rows: np.ndarray) -> None:
        parent.send(("raw-nixl", src_rows, dst_rows))
        while not parent.poll(0.002):
            agent.get_new_notifs()  # UCX needs this side to progress too (connection wireup)
        answer = parent.recv()
        assert answer == "arrived", answer

    memcpy_dst = torch.empty_like(raw)

    def memcpy() -> None:
        memcpy_dst.copy_(raw)

    times: dict[str, list[float]] = {name: [] for name in (*RELAYS, *RAWS, "memcpy")}
    try:
        for round_index in range(warmup + repeats):
            for name in times:
                if name in RELAYS:
                    go = relay(name, round_index)
                elif name.startswith("raw-nixl"):
                    go = raw_nixl(name == "raw-nixl-scattered", round_index)
                elif name == "memcpy":
                    go = memcpy
                else:
                    go = raw_zmq(name)
                started = time.perf_counter()
                go()
                elapsed = time.perf_counter() - started
                if round_index >= warmup:
                    times[name].append(elapsed)
                while nixl_sender.num_held:  # prefill's pages back before the next round
                    time.sleep(0.001)
    finally:
        parent.send(("stop",))
        process.join(timeout=30)
        nixl_sender.close()
        zmq_sender.close()
        for socket in raw_push.values():
            socket.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return summarise(times, kv_bytes)


def summarise(times: dict[str, list[float]], num_bytes: int) -> list[Row]:
    rows: dict[str, Row] = {}
    for name, samples in times.items():
        median, best = statistics.median(samples), min(samples)
        kind = "relay" if name in RELAYS else "memcpy" if name == "memcpy" else "raw"
        rows[name] = Row(
            name,
            kind,
            num_bytes,
            median * 1e3,
            best * 1e3,
            num_bytes / median / 1e9,
            num_bytes / best / 1e9,
            None,
        )
    for name in RELAYS:
        raw = rows[RAW_OF[name]]
        row = rows[name]
        rows[name] = Row(**{**asdict(row), "of_raw": row.median_gb_s / raw.median_gb_s})
    return list(rows.values())


def print_table(rows: list[Row], tokens: int) -> None:
    table = Table(
        title=f"KV of a {tokens}-token prompt ({rows[0].num_bytes / 1e6:.1f} MB), "
        "prefill process -> decode process"
    )
    for column in ("path", "median ms", "GB/s (median)", "GB/s (best)", "of raw"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for row in rows:
        table.add_row(
            f"{row.kind}: {row.path}",
            f"{row.median_ms:.1f}",
            f"{row.median_gb_s:.2f}",
            f"{row.best_gb_s:.2f}",
            "-" if row.of_raw is None else f"{row.of_raw:.0%}",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="torch threads per side (workers sharing a machine's cores run with one)",
    )
    args = parser.parse_args(argv)
    # One machine: UCX stays on loopback (and may use shared memory / CMA).
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    rows = run(args.tokens, args.repeats, args.warmup, args.num_threads)
    print_table(rows, args.tokens)
    if args.out is not None:
        record: dict[str, Any] = {
            "tokens": args.tokens,
            "repeats": args.repeats,
            "num_threads": args.num_threads,
            "load_average": os.getloadavg(),
            "rows": [asdict(row) for row in rows],
        }
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
