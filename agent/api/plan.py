"""From a validated request to what the runtime runs: sampling, choices, logprobs, tools, the constraint.

    plan = plan_generation(req, model, kind="chat", timeout_s=api.request_timeout_s)
    gen = model.generate(prompt, messages=plan.messages, **plan.generate_options(), ...)

Pure apart from compiling the constraint on the model's vocabulary. Every problem is an InputError
naming the request field (the server answers it with a 400).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from agent.runtime.constraints import Compiled, ConstraintSpec, compile_constraint
from agent.runtime.errors import InputError
from agent.runtime.sampling import SamplingParams
from agent.runtime.tools import ToolSpec, call_grammar, render_messages, template_knows_tools


@dataclass(frozen=True)
class Plan:
    sampling: SamplingParams
    n: int = 1
    logprobs: int | None = None
    messages: list[dict[str, Any]] | None = None
    template_tools: list[dict[str, Any]] | None = None
    tools: tuple[ToolSpec, ...] = ()  # tools whose calls are parsed out of the answer
    constraint: Compiled | None = None
    compile_s: float = 0.0

    def generate_options(self) -> dict[str, Any]:
        return {"sampling": self.sampling, "n": self.n, "logprobs": self.logprobs, "constraint": self.constraint,
                "tools": self.template_tools}


def sampling_of(req) -> SamplingParams:
    return SamplingParams(temperature=float(req.temperature if req.temperature is not None else 1.0),
                          top_k=req.top_k or 0, top_p=float(req.top_p or 1.0), seed=req.seed,
                          presence_penalty=float(req.presence_penalty or 0.0),
                          frequency_penalty=float(req.frequency_penalty or 0.0))


def format_spec(fmt) -> ConstraintSpec | None:
    """The constraint a `response_format` asks for (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ConstraintSpec("json_object", param="response_format")
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InputError("response_format.json_schema.schema is missing: give the JSON schema of the answer",
                             param="response_format.json_schema.schema")
        return ConstraintSpec("json_schema", fmt.json_schema.schema_, param="response_format.json_schema.schema",
                              strict=bool(fmt.json_schema.strict))
    if fmt.type == "regex":
        return ConstraintSpec("regex", fmt.regex, param="response_format.regex")
    return ConstraintSpec("grammar", fmt.grammar, param="response_format.grammar")


def tool_specs(req) -> list[ToolSpec]:
    specs, seen = [], set()
    for i, tool in enumerate(req.tools or []):
        f = tool.function
        spec = ToolSpec(f.name, f.parameters if f.parameters is not None else {}, f.description or "",
                        param=f"tools.{i}")
        if spec.name in seen:
            raise InputError(f"tools.{i}.function.name {spec.name!r} is given twice; tool names must be unique",
                             param=f"tools.{i}.function.name")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _tool_constraint(req, tools: list[ToolSpec], text: ConstraintSpec | None) -> ConstraintSpec | None:
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if not tools or choice == "none":
        return text
    if isinstance(choice, str):
        mode, name = choice, None
    else:
        mode, name = "named", choice.function.name
        if name not in {t.name for t in tools}:
            raise InputError(f"tool_choice names {name!r}, which is not among the tools "
                             f"({', '.join(t.name for t in tools)})", param="tool_choice")
    text_rule = None
    if mode == "auto" and text is not None:
        if text.kind == "json_object":
            text_rule = '%json {"type": "object", "x-guidance": {"whitespace_flexible": false}}'
        elif text.kind == "json_schema" and isinstance(text.source, dict):
            text_rule = "%json " + json.dumps({**text.source, "x-guidance": {"whitespace_flexible": False}})
        else:
            raise InputError(f"response_format {text.kind} cannot be combined with tools; use json_schema or "
                             "json_object, or tool_choice none", param="response_format")
    grammar = call_grammar(tools, mode=mode, parallel=req.parallel_tool_calls and mode != "named", name=name,
                           text=text_rule)
    return ConstraintSpec("lark", grammar, param="tools")


def plan_generation(req, model, *, kind: str, timeout_s: float) -> Plan:
    """Check the request against `model` and compile its constraint within `timeout_s`."""
    sampling = sampling_of(req)
    if kind == "chat" and req.top_logprobs is not None and not req.logprobs:
        raise InputError("top_logprobs needs logprobs: true", param="top_logprobs")
    text_spec = format_spec(req.response_format)
    messages = template_tools = None
    tools: list[ToolSpec] = []
    spec = text_spec
    if kind == "chat":
        tools = tool_specs(req)
        if req.tool_choice not in (None, "none", "auto") and not tools:
            raise InputError("tool_choice needs tools: give the functions the model may call", param="tool_choice")
        spec = _tool_constraint(req, tools, text_spec)
        raw = [_message(m) for m in req.messages]
        messages, template_tools = render_messages(raw, tools, native=template_knows_tools(
            model.codec.chat_template_source))
    constraint, compile_s = None, 0.0
    if spec is not None:
        t0 = time.monotonic()
        constraint = compile_constraint(spec, model.vocabulary(), timeout_s=timeout_s)
        compile_s = time.monotonic() - t0
    active = tuple(tools) if tools and req.tool_choice != "none" else ()
    return Plan(sampling, n=req.n, logprobs=req.top(), messages=messages, template_tools=template_tools,
                tools=active, constraint=constraint, compile_s=compile_s)


def _message(m) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                             for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
