"""From a validated request to what the workers are asked to do (a GenerationPlan)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import bad_request
from services.gateway.protocol import ResponseFormat, SamplingFields
from services.gateway.tokenizer import ModelInfo
from shared.grammar import GrammarError, GrammarSpec, check_grammar, tool_calls_ebnf
from shared.rpc import kvrelay_pb2 as pb
from shared.rpc.convert import sampling_to_pb
from shared.sampler import SamplingParams

_UINT64 = 1 << 64


@dataclass(frozen=True)
class GenerationPlan:
    request_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int  # counts the first token, which prefill samples
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    cache_salt: str | None = None  # enters the prompt's block hashes: a tenant's own cache
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids in the vocabulary
    n: int = 1  # choices: one prefill, n decode sequences sharing the prompt's KV
    lora: str | None = None  # LoRA adapter's name: the workers run the prompt through it
    lora_key: str | None = None  # its key in the block hashes (routing by cached prefix)
    logprobs: bool = False  # the client wants each token's logprob
    top_logprobs: int = 0  # and this many alternatives per token
    grammar: GrammarSpec | None = None  # structured output: what the answer must match
    return_routed_experts: bool = False  # MoE: each token's experts (SGLang's extension)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def sampling_params(self) -> pb.SamplingParams:
        # One mapping to the wire, shared with the workers' side (shared/rpc/convert.py).
        return sampling_to_pb(
            SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                seed=self.seed,
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=self.stop_token_ids,
                min_p=self.min_p,
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                repetition_penalty=self.repetition_penalty,
                min_new_tokens=self.min_new_tokens,
                logit_bias=self.logit_bias,
                n=self.n,
                top_logprobs=self.top_logprobs,
                grammar=self.grammar,
                return_routed_experts=self.return_routed_experts,
            )
        )


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def build_plan(
    model: ModelInfo,
    request: SamplingFields,
    prompt_token_ids: Sequence[int],
    *,
    request_id: str,
    max_tokens: int | None,
    logprobs: bool = False,
    top_logprobs: int = 0,
    tool_grammar: GrammarSpec | None = None,
) -> GenerationPlan:
    """Checks the lengths against the context and fills in the sampling defaults.

    `tool_grammar` (tool_calls_grammar's) makes the answer tool calls only."""
    prompt_len = len(prompt_token_ids)
    ctx = model.max_context
    if prompt_len == 0:
        raise bad_request("the prompt is empty (0 tokens)", "prompt")
    if max_tokens is None:
        if prompt_len >= ctx:
            raise bad_request(
                f"the prompt has {prompt_len} tokens, but the model's context is {ctx} tokens "
                f"and at least 1 must be left for the answer",
                "messages" if hasattr(request, "messages") else "prompt",
            )
        max_tokens = ctx - prompt_len
    elif prompt_len + max_tokens > ctx:
        raise bad_request(
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: "
            f"{prompt_len + max_tokens} tokens in all, more than the model's context of "
            f"{ctx} tokens",
            "max_tokens",
        )

    stop_ids: list[int] = [] if request.ignore_eos else list(model.eos_token_ids)
    for tok in request.stop_token_ids or []:
        if tok not in stop_ids:
            stop_ids.append(tok)
    model.check_token_ids(stop_ids, "stop_token_ids")

    stop = request.stop
    stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())

    min_tokens = request.min_tokens or 0
    if min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({min_tokens}) is more than max_tokens ({max_tokens})", "min_tokens"
        )
    logit_bias = tuple(sorted((request.logit_bias or {}).items()))
    model.check_token_ids([t for t, _ in logit_bias], "logit_bias")

    top_k = request.top_k if request.top_k is not None and request.top_k > 0 else 0
    top_k = min(top_k, model.vocab_size)  # larger means all of them; keeps it in int32
    adapter = model.adapter_for(request.model)  # the route checked the name (check_model)
    grammar = structured_output(request)
    if tool_grammar is not None:
        if grammar is not None:
            raise bad_request(
                "tool_choice 'required' or a named function makes the answer tool calls: "
                "it cannot also follow response_format, regex or ebnf",
                "tool_choice",
            )
        grammar = tool_grammar
    return GenerationPlan(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        max_new_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=top_k,
        # The wire type is uint64; any int the client sends maps onto it.
        seed=None if request.seed is None else request.seed % _UINT64,
        stop_token_ids=tuple(stop_ids),
        stop_strings=tuple(s for s in stop_strings if s),
        cache_salt=request.cache_salt or None,
        min_p=request.min_p or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,  # > 0 when given
        min_new_tokens=min_tokens,
        logit_bias=logit_bias,
        n=request.n or 1,
        lora=adapter.name if adapter is not None else None,
        lora_key=adapter.key if adapter is not None else None,
        logprobs=logprobs,
        top_logprobs=top_logprobs if logprobs else 0,
        grammar=grammar,
        return_routed_experts=bool(request.return_routed_experts),
    )


@dataclass(frozen=True)
class ToolCallFormat:
    """How a tool-call parser's model writes its calls (services/gateway/tool_parsers/)."""

    begin: str
    end: str
    separator: str  # between two calls
    arguments_key: str


TOOL_CALL_FORMATS = {
    "hermes": ToolCallFormat("<tool_call>\n", "\n</tool_call>", "\n", "arguments"),
    "qwen25": ToolCallFormat("<tool_call>\n", "\n</tool_call>", "\n", "arguments"),
    "qwen": ToolCallFormat("<tool_call>\n", "\n</tool_call>", "\n", "arguments"),
    "llama3": ToolCallFormat("", "", "; ", "parameters"),
}


def tool_calls_grammar(
    parser: str | None,
    functions: Sequence[tuple[str, dict[str, Any] | None]],
    *,
    max_calls: int | None,
) -> GrammarSpec | None:
    """The grammar that enforces tool_choice "required" or a named function: the answer is
    calls of `functions` (name, parameters schema) in the parser's format. None when the
    parser's format is unknown (the choice is then only checked, not enforced)."""
    fmt = TOOL_CALL_FORMATS.get(parser or "")
    if fmt is None or not functions:
        return None
    schemas = [
        json.dumps(
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    fmt.arguments_key: parameters or {"type": "object"},
                },
                "required": ["name", fmt.arguments_key],
            }
        )
        for name, parameters in functions
    ]
    try:
        source = tool_calls_ebnf(
            schemas, begin=fmt.begin, end=fmt.end, separator=fmt.separator, max_calls=max_calls
        )
    except GrammarError as exc:
        raise bad_request(f"tools: {exc}", "tools") from None
    return GrammarSpec("ebnf", source)


def structured_output(request: SamplingFields) -> GrammarSpec | None:
    """The grammar the answer must match: response_format (chat), regex or ebnf; at most
    one. Checked here, so a bad schema, regex or grammar is a 400 before any worker works."""
    specs: list[tuple[str, GrammarSpec]] = []
    response_format: ResponseFormat | None = getattr(request, "response_format", None)
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_schema":
            if response_format.json_schema is None:
                raise bad_request(
                    "response_format of type json_schema needs a json_schema", "response_format"
                )
            schema = response_format.json_schema.schema_
            spec = GrammarSpec("json_object")
            if schema is not None:
                spec = GrammarSpec("json_schema", json.dumps(schema))
        else:
            spec = GrammarSpec("json_object")
        specs.append(("response_format", spec))
    if request.regex is not None:
        specs.append(("regex", GrammarSpec("regex", request.regex)))
    if request.ebnf is not None:
        specs.append(("ebnf", GrammarSpec("ebnf", request.ebnf)))
    if not specs:
        return None
    if len(specs) > 1:
        raise bad_request(
            f"only one of response_format, regex and ebnf may constrain the answer, not "
            f"{' and '.join(name for name, _ in specs)}",
            specs[1][0],
        )
    param, spec = specs[0]
    try:
        check_grammar(spec)
    except GrammarError as exc:
        raise bad_request(str(exc), param) from None
    return spec
