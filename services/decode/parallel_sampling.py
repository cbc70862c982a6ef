"""Parallel sampling (`n` > 1): n decode sequences over one prompt's KV.

Prefill computes the prompt once and samples each choice's first token from the same
logits; decode then runs one sequence per choice. The choices share the prompt's full
pages (ref-counted in the pool, freed when the last choice lets go); the last, partial
page is copied for every choice but the first, because each choice writes its own next
tokens into it.
"""

from __future__ import annotations

from shared.kv_pool import KVPool


def pages_to_reserve(pool: KVPool, prompt_len: int, n: int) -> int:
    """Pages for the prompt's KV plus a copy of its partial last page per extra choice."""
    partial = prompt_len % pool.page_size != 0
    return pool.pages_for(prompt_len) + (n - 1 if partial else 0)


def fork_pages(pool: KVPool, prompt_len: int, reserved: list[int], n: int) -> list[list[int]]:
    """The page lists of n choices, from pages reserved by `pages_to_reserve`.

    `reserved` starts with the prompt's pages (their KV has arrived) and ends with the
    spare pages for the copies. Each returned list holds one reference to each of its
    pages: freeing all n lists returns every reserved page to the pool.
    """
    num_prompt_pages = pool.pages_for(prompt_len)
    prompt_pages, spares = reserved[:num_prompt_pages], reserved[num_prompt_pages:]
    full_pages = prompt_pages[: prompt_len // pool.page_size]
    partial_page = prompt_pages[len(full_pages) :]
    if len(spares) != (n - 1) * len(partial_page):
        raise ValueError(f"{len(spares)} spare pages for {n} choices of {prompt_len} tokens")
    choices = [list(prompt_pages)]
    for i in range(1, n):
        pool.incref(full_pages)
        copy = spares[i - 1 : i] if partial_page else []
        if copy:
            # All layers, K and V, of the page the choices will keep writing into.
            pool.kv[:, :, copy[0]].copy_(pool.kv[:, :, partial_page[0]])
        choices.append([*full_pages, *copy])
    return choices
