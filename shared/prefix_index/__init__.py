"""The global prefix index in Redis: which prefill worker holds which KV blocks.

Prefill workers publish (PrefixIndexPublisher, a thread); gateways read
(PrefixIndexReader, asyncio). The key schema is described in schema.py.
"""

from shared.prefix_index.publisher import PrefixIndexPublisher
from shared.prefix_index.reader import PrefixIndexReader, WorkerLoad, WorkerMatch
from shared.prefix_index.schema import (
    DEFAULT_KEY_PREFIX,
    IndexKeys,
    PrefixIndexUnavailable,
    WorkerStatus,
)
from shared.prefix_index.writer import IndexWriter

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "IndexKeys",
    "IndexWriter",
    "PrefixIndexPublisher",
    "PrefixIndexReader",
    "PrefixIndexUnavailable",
    "WorkerLoad",
    "WorkerMatch",
    "WorkerStatus",
]
