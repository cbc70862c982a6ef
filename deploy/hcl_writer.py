"""A small writer of HCL2 text (Nomad job files): blocks, attributes, expressions, heredocs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Expr:
    """An HCL expression written as is (`var.image`), not as a string."""

    text: str


@dataclass(frozen=True)
class Heredoc:
    """A multi-line string (`<<-EOT`); its text is written without interpolation markers."""

    text: str


@dataclass
class Block:
    kind: str
    labels: tuple[str, ...] = ()
    items: list[tuple[str, object] | Block | str] = field(default_factory=list)

    def attr(self, name: str, value: object) -> Block:
        self.items.append((name, value))
        return self

    def block(self, kind: str, *labels: str) -> Block:
        child = Block(kind, labels)
        self.items.append(child)
        return child

    def comment(self, text: str) -> Block:
        self.items.append(text)
        return self


def _string(text: str) -> str:
    # JSON escaping is HCL's for quoted strings, except that `${` / `%{` start templates
    # there: callers pass those on purpose (Nomad's runtime variables, var references).
    return json.dumps(text, ensure_ascii=False)


def _value(value: object, indent: str) -> str:
    if isinstance(value, Expr):
        return value.text
    if isinstance(value, Heredoc):
        body = "".join(f"{indent}  {line}\n" if line else "\n"
                       for line in value.text.rstrip("\n").split("\n"))
        return f"<<-EOT\n{body}{indent}EOT"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dict):
        inner = indent + "  "
        width = max((len(k) for k in value), default=0)
        lines = [f"{inner}{k.ljust(width)} = {_value(v, inner)}" for k, v in value.items()]
        return "{\n" + "\n".join(lines) + f"\n{indent}}}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v, indent) for v in value) + "]"
    raise TypeError(f"no HCL form for {value!r}")


def _block(block: Block, indent: str) -> list[str]:
    labels = "".join(f" {_string(label)}" for label in block.labels)
    if not block.items:
        return [f"{indent}{block.kind}{labels} {{}}"]
    lines = [f"{indent}{block.kind}{labels} {{"]
    inner = indent + "  "
    attrs = [item for item in block.items if isinstance(item, tuple)]
    width = max((len(name) for name, _ in attrs), default=0)
    previous_was_block = False
    for item in block.items:
        if isinstance(item, Block):
            # Blocks are set apart by a blank line, except empty ones in a row (ports).
            tight = not item.items and previous_was_block and block.items[0] is not item
            if lines[-1] != lines[0] and not (tight and lines[-1].endswith("{}")):
                lines.append("")
            lines.extend(_block(item, inner))
            previous_was_block = True
        elif isinstance(item, str):
            if previous_was_block:
                lines.append("")
            lines.append(f"{inner}# {item}")
            previous_was_block = False
        else:
            if previous_was_block:
                lines.append("")
            name, value = item
            lines.append(f"{inner}{name.ljust(width)} = {_value(value, inner)}")
            previous_was_block = False
    lines.append(f"{indent}}}")
    return lines


def write(blocks: Sequence[Block], header: str = "") -> str:
    parts = [header.rstrip("\n")] if header else []
    parts.extend("\n".join(_block(block, "")) for block in blocks)
    return "\n\n".join(parts) + "\n"
