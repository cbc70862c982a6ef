"""Conversions between control-plane messages and the runtime's own types."""

from __future__ import annotations

from shared.grammar import GrammarSpec
from shared.rpc import kvrelay_pb2 as pb
from shared.sampler import SamplingParams, TopLogprobs


def sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Proto3 zeros mean "off" where zero is not a meaningful value (top_p, top_k,
    repetition_penalty). Raises ValueError for values SamplingParams refuses."""
    return SamplingParams(
        temperature=float(msg.temperature),
        top_p=float(msg.top_p) if msg.top_p > 0 else 1.0,
        top_k=int(msg.top_k) if msg.top_k > 0 else -1,
        seed=int(msg.seed) if msg.HasField("seed") else None,
        max_new_tokens=int(msg.max_new_tokens),
        stop_token_ids=tuple(int(t) for t in msg.stop_token_ids),
        min_p=float(msg.min_p),
        frequency_penalty=float(msg.frequency_penalty),
        presence_penalty=float(msg.presence_penalty),
        repetition_penalty=float(msg.repetition_penalty) if msg.repetition_penalty > 0 else 1.0,
        min_new_tokens=int(msg.min_new_tokens),
        # Sorted: the same request gives equal SamplingParams whatever the map's order.
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in msg.logit_bias.items())),
        n=max(int(msg.n), 1),
        top_logprobs=int(msg.top_logprobs),
        grammar=GrammarSpec(msg.grammar_kind, msg.grammar) if msg.grammar_kind else None,
        return_routed_experts=bool(msg.return_routed_experts),
    )


def sampling_to_pb(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_new_tokens=params.max_new_tokens,
        stop_token_ids=list(params.stop_token_ids),
        min_p=params.min_p,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_new_tokens,
        logit_bias=dict(params.logit_bias),
        n=params.n,
        top_logprobs=params.top_logprobs,
        return_routed_experts=params.return_routed_experts,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.grammar is not None:
        msg.grammar_kind = params.grammar.kind
        msg.grammar = params.grammar.source
    return msg


def top_logprobs_to_pb(top: TopLogprobs) -> pb.TopLogprobs:
    return pb.TopLogprobs(token_ids=top[0], logprobs=top[1])


def top_logprobs_from_pb(msg: pb.TopLogprobs) -> TopLogprobs:
    return tuple(int(t) for t in msg.token_ids), tuple(float(x) for x in msg.logprobs)
