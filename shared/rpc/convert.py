"""Conversions between control-plane messages and the runtime's own types."""

from __future__ import annotations

from shared.rpc import kvrelay_pb2 as pb
from shared.sampler import SamplingParams


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
        top_k=int(msg.top_k) if msg.top_k > 0 else -1,
        seed=int(msg.seed) if msg.HasField("seed") else None,
        max_new_tokens=int(msg.max_new_tokens),
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
    )


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_new_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg
