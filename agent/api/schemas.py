"""Request bodies of the OpenAI-compatible API, validated with pydantic (extra fields ignored).

Fields the runtime cannot honour (`echo`) are refused with a clear 400 rather than silently ignored.
`response_format` takes OpenAI's `text`, `json_object` and `json_schema`, plus two extensions:
`{"type": "regex", "regex": "..."}` and `{"type": "grammar", "grammar": "..."}` (Lark or GBNF).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator

Number = StrictInt | StrictFloat


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr


class MessageToolCall(_Body):
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JsonSchemaFormat(_Body):
    name: StrictStr = "response"
    schema_: dict[str, Any] | StrictBool | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaFormat | None = None
    regex: StrictStr | None = None  # extension
    grammar: StrictStr | None = None  # extension: Lark (llguidance dialect) or llama.cpp GBNF


class FunctionDef(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Generate(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None  # extension (llama.cpp, vLLM have it too)
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=8)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    response_format: ResponseFormat | None = None
    user: StrictStr | None = None
    ignore_eos: StrictBool = False  # extension (vLLM): keep going past end-of-sequence tokens

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Generate):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = False  # OpenAI defaults to true; small models then repeat the call

    def top(self) -> int | None:
        """How many alternatives per token to report; None: no logprobs."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generate):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)] \
        | Annotated[list[StrictInt], Field(min_length=1)]
    echo: Literal[False] = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None  # legacy: alternatives per token

    def limit(self) -> int | None:
        return self.max_tokens

    def top(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt


class EmbeddingRequest(_Body):
    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)] \
        | Annotated[list[Annotated[list[Number], Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, str) and not v:
            raise ValueError("input must not be empty")
        return v

    def inputs(self) -> list:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ClassificationRequest(_Body):
    model: StrictStr
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=2048)]

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
