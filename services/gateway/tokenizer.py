"""The model as the gateway sees it: tokenizer, chat template, EOS ids and context length."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.gateway.errors import APIError, bad_request
from services.lora.catalog import AdapterEntry, LoraCatalog
from shared.config import served_model_name
from shared.model.config import ModelConfig
from shared.model.loader import resolve_model_dir

logger = logging.getLogger("kvrelay.gateway")


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
    adapters: LoraCatalog = field(default_factory=LoraCatalog)  # LoRA adapters of the workers

    def accepts(self, name: str | None) -> bool:
        return name is None or name in self.accepted_names or self.adapter_for(name) is not None

    def adapter_for(self, name: str | None) -> AdapterEntry | None:
        """The LoRA adapter a request's "model" names: "adapter" or "base:adapter"."""
        if name is None or name in self.accepted_names:
            return None
        base, sep, adapter = name.rpartition(":")
        if sep and base in self.accepted_names:
            return self.adapters.get(adapter)
        return self.adapters.get(name)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Chat messages (and tools) -> prompt token ids, through the chat template.

        `template_kwargs` are the request's extra template variables (chat_template_kwargs).
        """
        if self.chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise bad_request(
                f"model {self.served_name} has no chat template; use /v1/completions", "messages"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=[*tools] if tools else None,
                chat_template=self.chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **(template_kwargs or {}),
            )
        except APIError:
            raise
        except Exception as exc:  # a template's raise_exception() or a Jinja error
            raise bad_request(f"chat template rejected the messages: {exc}", "messages") from exc
        if not isinstance(text, str):
            raise APIError(500, "chat template did not render to text")
        # The template already wrote the special tokens (BOS, role markers) it wants.
        return self._encode(text, add_special_tokens=False, param="messages")

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completions prompt -> token ids (with BOS when the tokenizer adds one)."""
        return self._encode(text, add_special_tokens=True, param="prompt")

    def _encode(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # JSON may carry lone surrogates ("\ud800"); no tokenizer takes them.
            raise bad_request(f"the text is not valid Unicode: {exc.reason}", param) from None
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def template_source(self) -> str | None:
        """The chat template in use (the override or the tokenizer's), for format detection."""
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default, or the tool-use one
            template = "\n".join(str(t) for t in template.values())
        return template if isinstance(template, str) else None

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise bad_request(
                f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})", param
            )


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


def load_model_info(
    model_path: str | None,
    served_model_name_flag: str | None = None,
    chat_template: str | None = None,
) -> ModelInfo:
    model_dir = resolve_model_dir(model_path)
    config = ModelConfig.from_dir(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    max_context = config.max_context
    vocab_size = config.vocab_size
    eos = list(config.eos_token_ids)
    if not eos and tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    served = served_model_name(model_path, served_model_name_flag)
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
