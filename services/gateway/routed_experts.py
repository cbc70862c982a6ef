"""A choice's routed experts (SGLang's `return_routed_experts`), put together for the client.

Prefill sends the prompt's rows (the same for every choice), then decode one row per step
of the choice: the experts of the token that step computed, i.e. the choice's previous
token. The last answer token never runs through the model, so a choice has
`prompt_tokens + completion_tokens - 1` rows, as in SGLang. The client gets them as SGLang
encodes them: base64 of int32 little-endian [rows, num_layers, top_k], -1 in dense layers.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutedExperts:
    prompt: bytes  # the prompt's rows, from prefill
    prompt_len: int
    decoded: list[bytes] = field(default_factory=list)  # decode's rows, in order

    @property
    def row_bytes(self) -> int:
        return len(self.prompt) // self.prompt_len if self.prompt_len else 0

    def add(self, rows: bytes) -> None:
        if rows:
            self.decoded.append(rows)

    def encode(self, completion_tokens: int) -> str:
        """Base64 of the choice's rows: prompt and every answer token but the last.

        Decode may have computed a step past the answer's end (a stop string cut it, or
        more tokens came than max_tokens allows): those rows are not the answer's.
        """
        rows = self.prompt_len + max(completion_tokens - 1, 0)
        data = (self.prompt + b"".join(self.decoded))[: rows * self.row_bytes]
        return base64.b64encode(data).decode("ascii")


def decode_routed_experts(encoded: str, num_layers: int, top_k: int) -> np.ndarray:
    """What a client does with the field: int32 [tokens, num_layers, top_k]."""
    flat = np.frombuffer(base64.b64decode(encoded), dtype="<i4")
    return flat.reshape(-1, num_layers, top_k)
