"""Tool calls: rendering tools and past calls into the prompt, the grammar of a call, parsing calls back.

The model calls tools in one syntax, whatever the template (Hermes / Qwen2.5 style, documented in
docs/AGENT_API.md):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (it mentions `tools`) renders them and past calls itself; for any
other template the tools go into the system message (DEFAULT_PREAMBLE), past calls into the assistant
turn in the syntax above, and tool results into a user turn inside <tool_response> tags.

    tools = [ToolSpec.from_openai(t) for t in request_tools]
    prompt_messages, template_tools = render_messages(messages, tools, native=template_knows_tools(src))
    grammar = call_grammar(tools, mode="required", parallel=True)      # Lark text for llguidance
    content, calls = parse_calls(text, tools)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from agent.runtime.errors import InputError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
Mode = Literal["auto", "required", "named"]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)

DEFAULT_PREAMBLE = (
    "You can call the following tools. Their signatures, as JSON schemas, are inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a tool, answer with one <tool_call></tool_call> block per call, each holding a JSON object "
    "with the tool's name and its arguments:\n"
    "<tool_call>\n{{\"name\": <tool name>, \"arguments\": <arguments object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call; `parameters` is its JSON schema (an object schema)."""

    name: str
    parameters: dict[str, Any]
    description: str = ""
    param: str = "tools"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise InputError(f"{self.param}.function.name {self.name!r} must be 1-64 letters, digits, _ or -",
                             param=f"{self.param}.function.name")
        if not isinstance(self.parameters, dict) or not self.parameters:
            raise InputError(f"{self.param}.function.parameters is missing: give the tool {self.name!r} a JSON "
                             "schema for its arguments ({\"type\": \"object\", \"properties\": {}} for none)",
                             param=f"{self.param}.function.parameters")
        if self.parameters.get("type", "object") != "object":
            raise InputError(f"{self.param}.function.parameters of {self.name!r} must be an object schema "
                             f"(\"type\": \"object\"), got {self.parameters.get('type')!r}",
                             param=f"{self.param}.function.parameters")

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates expect it (transformers' convention)."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def template_knows_tools(template_source: str | None) -> bool:
    return bool(template_source) and "tools" in template_source


def render_messages(messages: list[dict[str, Any]], tools: list[ToolSpec], *,
                    native: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the chat template, the `tools` variable for it or None)."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{"id": c["id"], "type": "function",
                                    "function": {"name": c["name"], "arguments": _as_object(c["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, [t.openai() for t in tools] or None
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{OPEN}\n" + json.dumps({"name": c["name"], "arguments": _as_object(c["arguments"])},
                                               ensure_ascii=False) + f"\n{CLOSE}" for c in m["tool_calls"]]
            content = "\n".join([content, *blocks] if content else blocks)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    if tools:
        preamble = DEFAULT_PREAMBLE.format(tools="\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": out[0]["content"] + "\n\n" + preamble}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out, None


def _as_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def call_grammar(tools: list[ToolSpec], *, mode: Mode, parallel: bool, name: str | None = None,
                 text: str | None = None) -> str:
    """A Lark grammar (llguidance dialect) for the answer.

    required / named: one call (or several, `parallel`) and nothing else. auto: calls, or text that
    does not start with "<" (`text`: a Lark rule body for the text, e.g. `%json {...}`; default free).
    """
    chosen = [t for t in tools if name is None or t.name == name]
    rules = []
    for i, t in enumerate(chosen):
        # "#/$defs/..." references in the parameters resolve against the root: hoist the definitions there
        arguments = {k: v for k, v in t.parameters.items() if k not in ("$defs", "definitions")}
        hoisted = {k: t.parameters[k] for k in ("$defs", "definitions") if k in t.parameters}
        wrapper = {"type": "object", "properties": {"name": {"const": t.name}, "arguments": arguments},
                   "required": ["name", "arguments"], "additionalProperties": False,
                   "x-guidance": {"whitespace_flexible": False}, **hoisted}
        rules.append(f"fn_{i}: %json {json.dumps(wrapper)}")
    body = " | ".join(f"fn_{i}" for i in range(len(chosen)))
    lines = [
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        f'call: "{OPEN}\\n" ({body}) "\\n{CLOSE}"',
        *rules,
    ]
    if mode == "auto":
        lines.insert(0, "start: calls | text")
        lines.append("text: " + (text or r"/[^<](.|\n)*/"))
    else:
        lines.insert(0, "start: calls")
    return "\n".join(lines) + "\n"


def parse_calls(text: str, tools: list[ToolSpec]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): the <tool_call> blocks naming a known tool with JSON arguments become calls."""
    known = {t.name for t in tools}
    calls, spans = [], []
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or body.get("name") not in known:
            continue
        arguments = body.get("arguments", body.get("parameters", {}))
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", body["name"],
                              json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))))
        spans.append(match.span())
    if not calls:
        return text, []
    rest = text
    for start, end in reversed(spans):
        rest = rest[:start] + rest[end:]
    rest = rest.strip()
    return (rest or None), calls
