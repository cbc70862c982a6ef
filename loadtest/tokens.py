"""Token counts for prompts and answers: the server's tokenizer when it is here, else words.

With a Hugging Face tokenizer the counts are exact (the same tokenizer the server uses);
without one, prompts are built from a fixed word list at about one token per word and
the summary says the counts are approximate.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from shared.config import DEFAULT_MODEL_NAME

log = logging.getLogger("kvrelay.bench")

# Short, common English words: one token each in the usual BPE vocabularies.
_WORD_LIST = (
    "the of and to in is was for on are with as at be by this had not but from or have an "
    "they which one you were all we her she there been if more when will would who so no "
    "time could people into year your good some them see other than then now look only "
    "come its over think also back after use two how our work first well way even new want "
    "because any these give day most us city water house field plan river market table "
    "paper window garden letter number report story music north south light green model "
    "system order level price value power school family money point place group state"
)
FALLBACK_WORDS = tuple(_WORD_LIST.split())
_WHOLE_WORD = re.compile(r"^ [a-zA-Z]{2,12}$")


class TokenCounter(Protocol):
    """Counts tokens the way the server will, and supplies words to build prompts from."""

    name: str
    exact: bool

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def word_ids(self) -> list[int]: ...
    def count_completion_prompt(self, text: str) -> int: ...
    def count_chat_prompt(self, messages: list[dict[str, str]]) -> int: ...


class HFTokenCounter:
    """Exact counts with a transformers tokenizer."""

    exact = True

    def __init__(self, tokenizer: Any, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self._word_ids: list[int] | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def word_ids(self) -> list[int]:
        """Ids of tokens that are a space and a short word: readable, stable prompts."""
        if self._word_ids is None:
            special = set(self.tokenizer.all_special_ids)
            vocab = self.tokenizer.get_vocab()
            ids = [i for i in sorted(vocab.values()) if i not in special]
            texts = self.tokenizer.batch_decode([[i] for i in ids])
            self._word_ids = [i for i, t in zip(ids, texts, strict=True) if _WHOLE_WORD.match(t)]
            if len(self._word_ids) < 100:  # an unusual vocabulary: any ordinary token
                self._word_ids = ids
        return self._word_ids

    def count_completion_prompt(self, text: str) -> int:
        # Servers encode a raw completions prompt with the tokenizer's special tokens (BOS).
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def count_chat_prompt(self, messages: list[dict[str, str]]) -> int:
        if getattr(self.tokenizer, "chat_template", None) is None:
            return sum(len(self.encode(m["content"])) for m in messages)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return len(self.encode(str(text)))


class ApproxTokenCounter:
    """About one token per word: for servers whose tokenizer is not available here."""

    exact = False
    name = "approximate (words)"

    def encode(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(FALLBACK_WORDS)}
        return [index.get(w, len(FALLBACK_WORDS)) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(" " + FALLBACK_WORDS[i % len(FALLBACK_WORDS)] for i in ids)

    def word_ids(self) -> list[int]:
        return list(range(len(FALLBACK_WORDS)))

    def count_completion_prompt(self, text: str) -> int:
        return len(text.split())

    def count_chat_prompt(self, messages: list[dict[str, str]]) -> int:
        # Role markers of a typical template: about four tokens a message, three to open.
        return sum(len(m["content"].split()) + 4 for m in messages) + 3


def _load_hf(source: str) -> Any:
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def load_token_counter(tokenizer: str | None, model: str) -> TokenCounter:
    """`tokenizer` (a path or a cached hub id), else the model's own if it is here, else words.

    Never downloads: a tokenizer that is not on this machine means approximate counts.
    """
    if tokenizer:
        return HFTokenCounter(_load_hf(tokenizer), tokenizer)
    if model == DEFAULT_MODEL_NAME:
        from shared.model.loader import resolve_model_dir

        try:
            model_dir = resolve_model_dir(None)
            return HFTokenCounter(_load_hf(str(model_dir)), str(model_dir))
        except (FileNotFoundError, OSError, ValueError) as exc:
            log.warning("default model's tokenizer unavailable (%s)", exc)
    try:
        return HFTokenCounter(_load_hf(model), model)
    except (OSError, ValueError):
        log.warning("no local tokenizer for %r: token counts are approximate (use --tokenizer)",
                    model)
        return ApproxTokenCounter()
