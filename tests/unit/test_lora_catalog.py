"""The gateway's LoRA catalog: an adapter is served only where every worker serves it."""

from __future__ import annotations

from services.lora.catalog import AdapterEntry, LoraCatalog

A = AdapterEntry("a", "/adapters/a", "key-a", 8)
B = AdapterEntry("b", "/adapters/b", "key-b", 4)


def names(catalog: LoraCatalog) -> list[str]:
    return [e.name for e in catalog.entries()]


def test_listed_adapters_are_those_of_every_worker() -> None:
    catalog = LoraCatalog()
    assert not catalog.enabled and names(catalog) == []
    catalog.report("p:1", True, [A, B], asked_at=0)
    catalog.report("d:1", True, [A], asked_at=0)
    assert catalog.enabled and names(catalog) == ["a"]
    assert catalog.get("b") is None and catalog.known_anywhere("b")
    catalog.report("d:1", True, [A, B], asked_at=0)
    assert names(catalog) == ["a", "b"]
    # A worker without LoRA serves none of them.
    catalog.report("d:2", False, [], asked_at=0)
    assert names(catalog) == []


def test_same_name_with_other_files_is_not_served() -> None:
    catalog = LoraCatalog()
    catalog.report("p:1", True, [A], asked_at=0)
    catalog.report("d:1", True, [AdapterEntry("a", "/elsewhere/a", "other-key", 8)], asked_at=0)
    assert names(catalog) == []


def test_a_listing_older_than_our_change_is_ignored() -> None:
    catalog = LoraCatalog()
    catalog.report("p:1", True, [A, B], asked_at=0)
    asked_at = catalog.generation  # a periodic listing starts here...
    catalog.report("p:1", True, [A])  # ...then this gateway unloads b there
    catalog.report("p:1", True, [A, B], asked_at=asked_at)  # the listing's stale answer
    assert names(catalog) == ["a"]
    catalog.report("p:1", True, [A, B], asked_at=catalog.generation)  # a fresh one counts
    assert names(catalog) == ["a", "b"]


def test_hidden_adapter_is_not_served_while_being_unloaded() -> None:
    catalog = LoraCatalog()
    catalog.report("p:1", True, [A, B], asked_at=0)
    catalog.hide("b")
    assert names(catalog) == ["a"] and catalog.worker_has("p:1", "b")
    catalog.unhide("b")
    assert names(catalog) == ["a", "b"]
