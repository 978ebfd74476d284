"""The local OpenAI-compatible HTTP API (uvicorn + starlette; see docs/AGENT_API.md)."""

from agent.api.errors import ApiError, BadRequest, NotFound, Overloaded, PayloadTooLarge, Timeout
from agent.api.server import ApiServer

__all__ = ["ApiServer", "ApiError", "BadRequest", "NotFound", "Overloaded", "PayloadTooLarge", "Timeout"]
