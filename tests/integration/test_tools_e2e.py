"""Tool calls and reasoning end to end: a real cluster whose (tiny) model writes them.

A random model does not write `<tool_call>` by itself, so this one is built to: every
attention and MLP output is zero, so each position's logits depend on its own token only,
and the embeddings and the LM head chain a script of tokens (added to the tokenizer):

    "\n" (end of the generation prompt) -> <think> -> reasoning -> </think> -> "Let me check."
    -> <tool_call> -> {"name": "get_weather", "arguments":  -> {"city": "Paris",
    -> "unit": "celsius"}} -> </tool_call> -> <|im_end|>

The model runs on the real prefill and decode workers; the gateway renders a Hermes-style
chat template given with --chat-template (the tokenizer has none), and parses the text with
--tool-call-parser qwen25 and --reasoning-parser qwen3. Requests go through the official
OpenAI SDK, sync, async and streaming.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tests.cluster import Cluster, start_cluster
from tests.tiny_models import build_tiny_llama

MODEL = "tiny-tools"
EOS = 2  # <|im_end|>, build_tiny_llama's eos id
REASONING = "The user wants the weather in Paris."
PREAMBLE = "Let me check."
CALL_HEAD = '{"name": "get_weather", "arguments": '
ARGS_1 = '{"city": "Paris", '
ARGS_2 = '"unit": "celsius"}}'
ADDED_TOKENS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    REASONING,
    PREAMBLE,
    CALL_HEAD,
    ARGS_1,
    ARGS_2,
]
# The script, as (token, next token); "\n\n" ends a prompt whose thinking block is closed.
SCRIPT = [
    ("\n", "<think>"),
    ("<think>", REASONING),
    (REASONING, "</think>"),
    ("</think>", PREAMBLE),
    (PREAMBLE, "<tool_call>"),
    ("\n\n", "<tool_call>"),
    ("<tool_call>", CALL_HEAD),
    (CALL_HEAD, ARGS_1),
    (ARGS_1, ARGS_2),
    (ARGS_2, "</tool_call>"),
    ("</tool_call>", None),
]

# A Hermes/Qwen-style template, written for this test: tools in a system block, earlier
# calls as <tool_call> JSON, tool results as <tool_response>, enable_thinking as Qwen3's.
CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
You may call these functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content or "" }}
{%- for call in message.tool_calls %}<tool_call>{"name": {{ call.function.name | tojson }}, \
"arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}
{%- endif %}"""

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
OTHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def build_scripted_tool_model(out_dir: Path) -> Path:
    """The tiny Llama described above, with its tokenizer (no chat template of its own)."""
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_llama(out_dir / "base"))
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = None
    build_tiny_llama(
        out_dir, vocab_size=len(tokenizer), tie_word_embeddings=False, with_tokenizer=False
    )
    model = LlamaForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        for dim, (token, following) in enumerate(SCRIPT):
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (token, ids)
            embed[ids[0]] = 0.0
            embed[ids[0], dim] = 1.0  # the residual stream is this one-hot vector
            head[:, dim] = 0.0
            if following is None:
                head[EOS, dim] = 10.0
            else:
                (next_id,) = tokenizer(following, add_special_tokens=False)["input_ids"]
                head[next_id, dim] = 10.0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_scripted_tool_model(tmp_path_factory.mktemp("tiny-tools"))


def start_tools_cluster(model_dir: Path, log_dir: Path, *extra_gateway_args: str) -> Cluster:
    template = log_dir / "template.jinja"
    log_dir.mkdir(parents=True, exist_ok=True)
    template.write_text(CHAT_TEMPLATE)
    return start_cluster(
        model_dir,
        log_dir,
        model_name=MODEL,
        kv_cache_mb=16,
        worker_args=["--num-threads", "1"],
        gateway_args=[
            "--chat-template",
            str(template),
            "--tool-call-parser",
            "qwen25",
            "--reasoning-parser",
            "qwen3",
            *extra_gateway_args,
        ],
    )


@pytest.fixture(scope="module")
def cluster(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_tools_cluster(model_dir, tmp_path_factory.mktemp("tools-cluster"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def client(cluster: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def create(client: openai.OpenAI, **fields: Any) -> Any:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "temperature": 0,
        "max_tokens": 32,
        "tools": [WEATHER_TOOL, OTHER_TOOL],
    }
    body.update(fields)
    return client.chat.completions.create(**body)


def answer_of(response: Any) -> dict[str, Any]:
    """What a non-streamed answer says, without the call ids (new ones each time)."""
    choice = response.choices[0]
    message = choice.message
    calls = [(c.type, c.function.name, c.function.arguments) for c in message.tool_calls or []]
    return {
        "content": message.content,
        "reasoning": getattr(message, "reasoning_content", None),
        "calls": calls,
        "finish_reason": choice.finish_reason,
    }


def streamed_answer(chunks: list[Any]) -> dict[str, Any]:
    """The chunks of a stream put back together as answer_of() sees an answer; checks the
    shape of the tool-call deltas on the way."""
    content, reasoning, finish = "", "", None
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for call in delta.tool_calls or []:
            if call.index not in calls:
                # OpenAI's first delta of a call: id, type and the whole name.
                assert call.id and call.id.startswith("call_") and call.type == "function"
                assert call.function.name
                calls[call.index] = [call.type, call.function.name, ""]
            else:
                assert call.id is None and call.function.name is None
            calls[call.index][2] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {
        "content": content or None,
        "reasoning": reasoning or None,
        "calls": [tuple(calls[i]) for i in sorted(calls)],
        "finish_reason": finish,
    }


EXPECTED_CALL = ("function", "get_weather", ARGS_1 + ARGS_2[:-1])


def test_tool_call_and_reasoning(client: openai.OpenAI) -> None:
    response = create(client)
    assert answer_of(response) == {
        "content": PREAMBLE,
        "reasoning": REASONING,
        "calls": [EXPECTED_CALL],
        "finish_reason": "tool_calls",
    }
    call = response.choices[0].message.tool_calls[0]
    assert call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # The script's tokens, the call's closing tag and <|im_end|>.
    assert response.usage.completion_tokens == 10


def test_stream_put_together_is_the_whole_answer(client: openai.OpenAI) -> None:
    whole = answer_of(create(client))
    chunks = list(create(client, stream=True))
    assert streamed_answer(chunks) == whole
    argument_pieces = [
        c.choices[0].delta.tool_calls[0].function.arguments
        for c in chunks
        if c.choices and c.choices[0].delta.tool_calls
    ]
    # Decode may send several tokens in one message, so how the arguments are cut varies
    # (the parsers' unit tests feed them token by token); the header comes first.
    assert argument_pieces[0] in ("", ARGS_1, ARGS_1 + ARGS_2[:-1])
    assert "".join(argument_pieces) == EXPECTED_CALL[2]
    assert chunks[0].choices[0].delta.role == "assistant"


def test_sdk_stream_helper_accumulates_the_same_message(client: openai.OpenAI) -> None:
    whole = answer_of(create(client))
    body = {
        "model": MODEL,
        "messages": ASK,
        "temperature": 0,
        "max_tokens": 32,
        "tools": [WEATHER_TOOL, OTHER_TOOL],
    }
    with client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    assert answer_of(final) == whole


def test_async_client(cluster: Cluster, client: openai.OpenAI) -> None:
    whole = answer_of(create(client))

    async def run() -> tuple[Any, list[Any]]:
        aclient = openai.AsyncOpenAI(
            base_url=f"{cluster.base_url}/v1", api_key="x", max_retries=0, timeout=60
        )
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": ASK,
            "temperature": 0,
            "max_tokens": 32,
            "tools": [WEATHER_TOOL],
        }
        # Both at once: each answer has its own parsers.
        response, stream = await asyncio.gather(
            aclient.chat.completions.create(**body),
            aclient.chat.completions.create(**body, stream=True),
        )
        chunks = [chunk async for chunk in stream]
        await aclient.close()
        return response, chunks

    response, chunks = asyncio.run(run())
    assert answer_of(response) == whole
    assert streamed_answer(chunks) == whole


def test_thinking_disabled_by_chat_template_kwargs(client: openai.OpenAI) -> None:
    # The template closes the thinking block itself: the model goes straight to the call.
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    response = create(client, extra_body=kwargs)
    expected = {
        "content": None,
        "reasoning": None,
        "calls": [EXPECTED_CALL],
        "finish_reason": "tool_calls",
    }
    assert answer_of(response) == expected
    assert streamed_answer(list(create(client, extra_body=kwargs, stream=True))) == expected


def test_separate_reasoning_false_leaves_it_in_the_content(client: openai.OpenAI) -> None:
    response = create(client, extra_body={"separate_reasoning": False})
    assert answer_of(response) == {
        "content": f"<think>{REASONING}</think>{PREAMBLE}",
        "reasoning": None,
        "calls": [EXPECTED_CALL],
        "finish_reason": "tool_calls",
    }


@pytest.mark.parametrize("fields", [{"tool_choice": "none"}, {"tools": None}])
def test_without_tools_the_call_is_text(client: openai.OpenAI, fields: dict[str, Any]) -> None:
    fields = {k: (openai.omit if v is None else v) for k, v in fields.items()}
    expected = {
        "content": f"{PREAMBLE}<tool_call>{CALL_HEAD}{ARGS_1}{ARGS_2}</tool_call>",
        "reasoning": REASONING,
        "calls": [],
        "finish_reason": "stop",
    }
    assert answer_of(create(client, **fields)) == expected
    assert streamed_answer(list(create(client, stream=True, **fields))) == expected


def test_named_and_required_tool_choice(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in (named, "required", "auto"):
        assert answer_of(create(client, tool_choice=choice))["calls"] == [EXPECTED_CALL]
    with pytest.raises(openai.BadRequestError) as unknown:
        create(client, tool_choice={"type": "function", "function": {"name": "get_stock"}})
    assert unknown.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        create(client, tools=openai.omit, tool_choice="required")


def test_call_to_a_function_not_offered_is_text(client: openai.OpenAI) -> None:
    response = create(client, tools=[OTHER_TOOL])
    answer = answer_of(response)
    assert answer["calls"] == [] and answer["finish_reason"] == "stop"
    assert answer["content"] == f"{PREAMBLE}<tool_call>{CALL_HEAD}{ARGS_1}{ARGS_2}</tool_call>"


def test_answer_cut_inside_the_call(client: openai.OpenAI) -> None:
    # <think>, reasoning, </think>, preamble, <tool_call>, head, first arguments: 7 tokens.
    response = create(client, max_tokens=7)
    expected = {
        "content": PREAMBLE,
        "reasoning": REASONING,
        "calls": [("function", "get_weather", ARGS_1)],
        "finish_reason": "length",
    }
    assert answer_of(response) == expected
    assert streamed_answer(list(create(client, max_tokens=7, stream=True))) == expected


def test_history_with_calls_and_results_goes_through_the_template(
    client: openai.OpenAI, model_dir: Path
) -> None:
    history: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
        {"role": "user", "content": "And in Rome?"},
    ]
    response = create(client, messages=history)
    assert answer_of(response)["calls"] == [EXPECTED_CALL]
    # The prompt is the template's rendering with the arguments as an object (`| tojson`).
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = [dict(m) for m in history]
    rendered[1] = {
        **rendered[1],
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    text = tokenizer.apply_chat_template(
        rendered,
        tools=[WEATHER_TOOL, OTHER_TOOL],
        chat_template=CHAT_TEMPLATE,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>" in text
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt_ids)
