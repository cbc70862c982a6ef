"""Tool calls out of model text, per model family (`--tool-call-parser`, SGLang's names)."""

from __future__ import annotations

from services.gateway.tool_parsers.base import ToolCallPiece, ToolParse, ToolParser
from services.gateway.tool_parsers.hermes import CALL_START, HermesToolParser
from services.gateway.tool_parsers.llama3 import PYTHON_TAG, Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen25": HermesToolParser,  # Qwen 2.5 and 3 write Hermes' tags
    "qwen": HermesToolParser,
    "llama3": Llama3JsonToolParser,
}

__all__ = [
    "TOOL_PARSERS",
    "ToolCallPiece",
    "ToolParse",
    "ToolParser",
    "default_tool_parser",
    "make_tool_parser",
]


def default_tool_parser(chat_template: str | None) -> str | None:
    """The parser for the call format a chat template teaches its model, if it has one."""
    if not chat_template:
        return None
    if CALL_START in chat_template:
        return "hermes"
    # Llama 3.1+: the tag of its built-in tools, or JSON calls with "parameters" (ipython role).
    llama_json = '"parameters"' in chat_template and "ipython" in chat_template
    if PYTHON_TAG in chat_template or llama_json:
        return "llama3"
    return None


def make_tool_parser(
    name: str, tool_names: frozenset[str], *, max_calls: int | None = None
) -> ToolParser:
    try:
        cls = TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(TOOL_PARSERS)
        raise ValueError(f"unknown tool call parser {name!r}; known: {known}") from None
    return cls(tool_names, max_calls=max_calls)
