"""The gateway's view of the LoRA adapters: what each worker serves, and what it lists.

A request may use an adapter only if every worker could serve it: the catalog lists the
adapters that all workers which answered have loaded, with the same files (key). Workers
report their adapters when asked (a periodic listing) and in their answers to load and
unload; a listing asked for before this gateway last changed a worker is stale and is
ignored, so a slow listing never brings back an adapter just unloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

logger = logging.getLogger("kvrelay.gateway")


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str
    key: str  # the block hashes' LoRA key (a digest of the adapter's files)
    rank: int


@dataclass(frozen=True)
class _WorkerAdapters:
    enabled: bool  # started with --enable-lora
    adapters: dict[str, AdapterEntry]


class LoraCatalog:
    def __init__(self) -> None:
        self._workers: dict[str, _WorkerAdapters] = {}  # worker address -> what it serves
        self._changed_at: dict[str, int] = {}  # worker address -> generation of our change
        self._generation = 0
        self._hidden: set[str] = set()  # being unloaded: no new requests
        self._listed: dict[str, AdapterEntry] = {}
        self._conflicts_logged: set[str] = set()

    @property
    def generation(self) -> int:
        """Take it before asking workers for a listing; pass it to `report` with the answer."""
        return self._generation

    @property
    def enabled(self) -> bool:
        """Some worker serves LoRA adapters."""
        return any(w.enabled for w in self._workers.values())

    def get(self, name: str) -> AdapterEntry | None:
        return self._listed.get(name)

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._listed.values(), key=lambda e: e.name)

    def worker_has(self, worker: str, name: str) -> bool:
        known = self._workers.get(worker)
        return known is not None and name in known.adapters

    def known_anywhere(self, name: str) -> bool:
        return any(name in w.adapters for w in self._workers.values())

    def report(
        self,
        worker: str,
        enabled: bool,
        adapters: Iterable[AdapterEntry],
        asked_at: int | None = None,
    ) -> None:
        """What `worker` serves: a listing asked at generation `asked_at`, or (None) its
        answer to a change this gateway made."""
        if asked_at is None:
            self._generation += 1
            self._changed_at[worker] = self._generation
        elif asked_at < self._changed_at.get(worker, 0):
            return  # asked before our last change there reached it
        self._workers[worker] = _WorkerAdapters(enabled, {a.name: a for a in adapters})
        self._recompute()

    def hide(self, name: str) -> None:
        self._hidden.add(name)
        self._recompute()

    def unhide(self, name: str) -> None:
        self._hidden.discard(name)
        self._recompute()

    def _recompute(self) -> None:
        workers = list(self._workers.values())
        if not workers:
            self._listed = {}
            return
        listed: dict[str, AdapterEntry] = {}
        for name, entry in workers[0].adapters.items():
            others = [w.adapters.get(name) for w in workers[1:]]
            if name in self._hidden or any(o is None for o in others):
                continue
            if any(o is not None and o.key != entry.key for o in others):
                if name not in self._conflicts_logged:
                    self._conflicts_logged.add(name)
                    logger.warning("LoRA adapter %s differs between workers: not served", name)
                continue
            listed[name] = entry
        self._listed = listed
