"""The model as the gateway sees it: tokenizer, chat template, EOS ids and context length."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.errors import APIError, bad_request

logger = logging.getLogger("kvrelay.gateway")

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class ModelInfo:
    model_dir: Path
    served_name: str
    accepted_names: frozenset[str]  # what a request's "model" may say
    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None  # None: the tokenizer's own
    max_context: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int

    def accepts(self, name: str | None) -> bool:
        return name is None or name in self.accepted_names

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Chat messages -> prompt token ids, through the chat template."""
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise bad_request(
                f"model {self.served_name} has no chat template; use /v1/completions", "messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
        except APIError:
            raise
        except Exception as exc:  # a template's raise_exception() or a Jinja error
            raise bad_request(f"chat template rejected the messages: {exc}", "messages") from exc
        if not isinstance(text, str):
            raise APIError(500, "chat template did not render to text")
        # The template already wrote the special tokens (BOS, role markers) it wants.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completions prompt -> token ids (with BOS when the tokenizer adds one)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})", param
            )


def resolve_model_dir(model_path: str | None) -> Path:
    """The HF-style model directory: through shared.model.loader when it is there."""
    if model_path is not None:
        path = Path(model_path).expanduser()
        # The gateway reads only the config and tokenizer: a directory without weights will do.
        if path.is_dir() and (path / "config.json").is_file():
            return path
    try:
        from shared.model.loader import resolve_model_dir as _resolve
    except ImportError:
        # The loader is optional for the gateway: a plain directory is all it needs.
        if model_path is None:
            raise RuntimeError(
                "no model_path given and shared.model.loader (default model) is unavailable"
            ) from None
        return Path(model_path)
    return Path(_resolve(model_path))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open() as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _load_chat_template(spec: str | None) -> str | None:
    if spec is None:
        return None
    # A Jinja template always has a tag; anything else must be a file.
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat template file not found: {spec}")
    return path.read_text()


def _served_name(model_path: str | None, served_model_name: str | None) -> str:
    if served_model_name:
        return served_model_name
    if model_path is None:
        return DEFAULT_SERVED_NAME
    return os.path.basename(os.path.normpath(model_path)) or model_path


def load_model_info(
    model_path: str | None,
    served_model_name: str | None = None,
    chat_template: str | None = None,
) -> ModelInfo:
    model_dir = resolve_model_dir(model_path)
    config = _read_json(model_dir / "config.json")
    # Multimodal configs keep the language model's settings under text_config.
    text_config = config.get("text_config")
    sources = [config, text_config] if isinstance(text_config, dict) else [config]
    gen_config = _read_json(model_dir / "generation_config.json")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    max_context = next(
        (int(src[k]) for src in sources for k in _CONTEXT_KEYS if isinstance(src.get(k), int)),
        None,
    )
    if max_context is None:
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10_000_000:
            max_context = tok_max
        else:
            raise ValueError(f"cannot tell the context length of the model in {model_dir}")

    eos: list[int] = []
    for ident in _as_id_list(config.get("eos_token_id")) + _as_id_list(
        gen_config.get("eos_token_id")
    ):
        if ident not in eos:
            eos.append(ident)
    if not eos and tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))

    vocab_size = next(
        (int(src["vocab_size"]) for src in sources if isinstance(src.get("vocab_size"), int)),
        len(tokenizer),
    )
    served = _served_name(model_path, served_model_name)
    names = {served}
    if model_path is not None:
        names.add(model_path)
    info = ModelInfo(
        model_dir=model_dir,
        served_name=served,
        accepted_names=frozenset(names),
        tokenizer=tokenizer,
        chat_template=_load_chat_template(chat_template),
        max_context=max_context,
        eos_token_ids=tuple(eos),
        vocab_size=vocab_size,
    )
    logger.info(
        "model %s from %s: max_context=%d eos=%s vocab=%d",
        served,
        model_dir,
        max_context,
        list(eos),
        vocab_size,
    )
    return info
