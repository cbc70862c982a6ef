"""Pydantic models of the OpenAI-compatible API (requests in, responses out).

Requests ignore unknown fields, as other OpenAI-compatible servers do with `extra_body`
options they do not know; ranges are checked here so that a bad value is a 400 that
names the field. Types are strict, as in OpenAI's API: "5" is no number and 0 no boolean
(an int is a float, though).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    model_serializer,
    model_validator,
)

from shared.sampler import MAX_CHOICES, MAX_TOP_LOGPROBS

# Lax: logit_bias names its token ids in JSON object keys, which are strings.
TokenId = Annotated[int, Field(ge=0), Strict(False)]


def _check_top_k(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError("top_k must be -1 (all tokens) or at least 1")
    return value


TopK = Annotated[int, AfterValidator(_check_top_k)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = False


class ContentPart(_Request):
    # Only "text" parts are usable; others (images, audio) are refused when the prompt is built.
    type: str
    text: str | None = None


# OpenAI's rule for function names; the name is what the model writes back in its call.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema object
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallIn(_Request):
    name: str
    arguments: str | dict[str, Any]  # a JSON string in OpenAI's API; an object is accepted too


class ToolCallIn(_Request):
    """A call the assistant made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: which call this is the result of
    reasoning_content: str | None = None  # assistant messages, for templates that show it

    @model_validator(mode="after")
    def _check_tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages can have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs a tool_call_id")
        return self


class JsonSchemaFormat(_Request):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: the JSON name is an alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # None: any object
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's structured outputs: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required with type "json_schema"


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Token id (a string in JSON) -> bias added to its logit; the ids are checked against
    # the vocabulary when the request is planned.
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # Extensions (extra_body), named as in vLLM/SGLang.
    top_k: TopK | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_tokens: int | None = Field(default=None, ge=0)  # at most max_tokens
    ignore_eos: bool | None = False
    stop_token_ids: list[TokenId] | None = None
    # Isolates this tenant's cached prefixes from others' (vLLM's name for it).
    cache_salt: str | None = Field(default=None, max_length=1024)
    # Structured outputs beyond response_format (SGLang's): the answer matches this regex,
    # or this EBNF grammar (its root rule is `root`).
    regex: str | None = None
    ebnf: str | None = None
    # SGLang's: each choice also returns the MoE experts every token was routed to (workers
    # started with --enable-return-routed-experts; a 400 otherwise).
    return_routed_experts: bool | None = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, "none" without
    parallel_tool_calls: bool | None = None  # false: at most one call per answer
    response_format: ResponseFormat | None = None
    # Extensions: continue the last (assistant) message instead of starting a new one.
    add_generation_prompt: bool | None = None  # default: not continue_final_message
    continue_final_message: bool | None = False
    # Extensions (SGLang's): reasoning apart from the answer (default: when the server has a
    # reasoning parser), and variables for the chat template (e.g. enable_thinking).
    separate_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def _without_none(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (k in keys and v is None)}


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls or reasoning
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # content stays (null is meaningful); the extensions appear only when there are some.
        data: dict[str, Any] = handler(self)
        return _without_none(data, ("reasoning_content", "tool_calls"))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes (a token may hold part of a character)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most probable tokens at this position


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # where each token starts in the choice's text


class _RoutedExpertsField(BaseModel):
    """A choice's `routed_experts` (return_routed_experts), only when there are some: base64
    of int32 little-endian [prompt + completion tokens - 1, layers, top_k] (SGLang's
    encoding); on a stream, in each choice's last chunk."""

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return _without_none(data, ("routed_experts",))


class ChatCompletionChoice(_RoutedExpertsField):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatChoiceLogprobs | None = None
    routed_experts: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class DeltaToolCall(BaseModel):
    """A piece of a tool call: id, type and name come once, then pieces of the arguments."""

    index: int  # of the call within its choice
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI's deltas only carry the keys that change: {"content": "x"}, or {} at the end.
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None}


class ChatCompletionStreamChoice(_RoutedExpertsField):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatChoiceLogprobs | None = None
    routed_experts: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionChoice(_RoutedExpertsField):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    routed_experts: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


EmbeddingInput = Annotated[
    str | list[str] | list[TokenId] | list[list[TokenId]],
    Field(description="text, texts, token ids, or lists of token ids"),
]


class EmbeddingRequest(_Request):
    input: EmbeddingInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvrelay"
    max_model_len: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the API (OpenAI's shape)."""

    error: ErrorDetail


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
