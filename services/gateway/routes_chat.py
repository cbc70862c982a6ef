"""POST /v1/chat/completions."""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from transformers import PreTrainedTokenizerBase

from services.gateway.chat_output import ChatStream, OutputSpec, whole_message
from services.gateway.errors import OPENAPI_ERRORS, bad_request, not_supported
from services.gateway.logprobs import chat_logprobs, token_bytes_for
from services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    NamedToolChoice,
)
from services.gateway.reasoning import THINK_START
from services.gateway.routes_common import (
    Collected,
    reject_unsupported_sampling,
    respond,
)
from services.gateway.sampling import build_plan, new_request_id, tool_calls_grammar
from services.gateway.state import GatewayState, get_state
from services.gateway.tool_parsers import default_tool_parser
from shared.grammar import GrammarSpec

router = APIRouter()

# apply_chat_template's own arguments: chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
) - {"self", "kwargs"} | {"messages"}


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts: list[str] = []
        for part in content:
            param = f"messages.{index}.content"
            if part.type != "text":
                raise not_supported(f"message content of type {part.type!r}", param)
            if part.text is None:
                raise bad_request("a content part of type 'text' needs a 'text' field", param)
            texts.append(part.text)
        text = "\n".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": text}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": call.type,
                "function": {
                    "name": call.function.name,
                    "arguments": _arguments_for_template(call.function.arguments),
                },
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def _arguments_for_template(arguments: str | dict[str, Any]) -> Any:
    # Templates write the arguments with `| tojson`: they expect an object, not JSON text.
    if isinstance(arguments, dict):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    reject_unsupported_sampling(body)
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")


def _tools(body: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, frozenset[str]]:
    """The tools to show the model (none when tool_choice is "none") and their names."""
    tools = body.tools or []
    names = [t.function.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise bad_request(f"tools: the function {duplicates[0]!r} is defined twice", "tools")
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and choice != "auto" and not tools:
        raise bad_request("tool_choice needs tools to choose from", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(
            f"tool_choice names the function {choice.function.name!r}, which is not in tools",
            "tool_choice",
        )
    if choice == "none" or not tools:
        return None, frozenset()
    return [t.model_dump(exclude_none=True) for t in tools], frozenset(names)


def _tool_grammar(body: ChatCompletionRequest, spec: OutputSpec) -> GrammarSpec | None:
    """tool_choice "required" or a named function, enforced: the answer can only be calls
    in the tool parser's format. Not with a reasoning parser (its model thinks first)."""
    choice = body.tool_choice
    named = isinstance(choice, NamedToolChoice)
    if not spec.tool_names or spec.reasoning_parser or not (named or choice == "required"):
        return None
    functions = [
        (t.function.name, t.function.parameters)
        for t in body.tools or []
        if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name
    ]
    one = named or body.parallel_tool_calls is False
    return tool_calls_grammar(spec.tool_parser, functions, max_calls=1 if one else None)


def _template_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
    kwargs = body.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if reserved:
        raise bad_request(
            f"chat_template_kwargs may not set {reserved[0]!r}; it has its own request field "
            "or is the server's to choose",
            "chat_template_kwargs",
        )
    return kwargs


def _output_spec(
    state: GatewayState,
    body: ChatCompletionRequest,
    prompt_ids: list[int],
    tool_names: frozenset[str],
) -> OutputSpec:
    config = state.config
    reasoning = config.reasoning_parser
    if body.separate_reasoning is False:
        reasoning = None
    opens_thinking = False
    if reasoning:
        # The template may have opened the thinking block itself (Qwen3 thinking models).
        tail = state.model.tokenizer.decode(prompt_ids[-4:], skip_special_tokens=False)
        opens_thinking = isinstance(tail, str) and tail.rstrip().endswith(THINK_START)
    tool_parser = None
    if tool_names:
        tool_parser = config.tool_call_parser or default_tool_parser(state.model.template_source)
    return OutputSpec(
        reasoning_parser=reasoning,
        prompt_opens_thinking=opens_thinking,
        tool_parser=tool_parser,
        tool_names=tool_names,
        max_calls=1 if body.parallel_tool_calls is False else None,
    )


@router.post("/v1/chat/completions", response_model=None, responses=OPENAPI_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    state.check_model(body.model)
    _reject_unsupported(body)
    continue_final = bool(body.continue_final_message)
    if continue_final and body.add_generation_prompt:
        raise bad_request(
            "continue_final_message and add_generation_prompt cannot both be true",
            "continue_final_message",
        )
    if continue_final and body.messages[-1].role != "assistant":
        raise bad_request(
            "continue_final_message needs an assistant message last", "continue_final_message"
        )
    add_generation_prompt = (
        not continue_final if body.add_generation_prompt is None else body.add_generation_prompt
    )
    tools, tool_names = _tools(body)
    messages = [_message_dict(i, m) for i, m in enumerate(body.messages)]
    prompt_ids = state.model.render_chat(
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        tools=tools,
        template_kwargs=_template_kwargs(body),
    )
    spec = _output_spec(state, body, prompt_ids, tool_names)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens else body.max_tokens
    request_id = new_request_id("chatcmpl")
    plan = build_plan(
        state.model,
        body,
        prompt_ids,
        request_id=request_id,
        max_tokens=max_tokens,
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        tool_grammar=_tool_grammar(body, spec),
    )
    token_bytes = token_bytes_for(state.model.tokenizer) if body.logprobs else None
    created = int(time.time())
    model_name = state.model.served_name
    if body.model and state.model.adapter_for(body.model):
        model_name = body.model  # an adapter answers under the name the request gave it
    events = state.generator.generate(plan)

    include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
    stream = ChatStream(
        request_id, created, model_name, include_usage, spec, n=body.n or 1, token_bytes=token_bytes
    )

    def build_response(result: Collected) -> ChatCompletionResponse:
        choices = []
        for collected in result.choices:
            message, output = whole_message(spec, collected.text)
            choices.append(
                ChatCompletionChoice(
                    index=collected.index,
                    message=message,
                    finish_reason=output.finish_reason(collected.finish_reason),
                    logprobs=(
                        chat_logprobs(token_bytes, collected.logprobs)
                        if token_bytes is not None
                        else None
                    ),
                    routed_experts=collected.routed_experts,
                )
            )
        return ChatCompletionResponse(
            id=request_id, created=created, model=model_name, choices=choices, usage=result.usage
        )

    return await respond(
        request,
        stream.parse(events) if body.stream else events,
        stream=bool(body.stream),
        fmt=stream,
        include_usage=include_usage,
        request_id=request_id,
        build_response=build_response,
    )
