"""HTTP API errors, each rendered as an OpenAI-style body {"error": {message, type, param, code}}.

    ApiError(Exception)                   .status, .type, .code, .param, .headers()
    ├── BadRequest(ValueError)            400 invalid_request_error (malformed JSON, wrong types, ranges)
    ├── Unauthorized(PermissionError)     401 with WWW-Authenticate (api.token_file set, token missing/wrong)
    ├── Forbidden(PermissionError)        403 (a foreign Host, a cross-origin browser request)
    ├── NotFound(LookupError)             404 (unknown route or model)
    ├── MethodNotAllowed                  405
    ├── LengthRequired(ValueError)        411 (a chunked body: send Content-Length)
    ├── PayloadTooLarge(ValueError)       413
    ├── UnsupportedMediaType(ValueError)  415 (a body that is not application/json)
    ├── Overloaded                        503 with Retry-After (queue full, no model, shutting down)
    └── Timeout(TimeoutError)             504 (request_timeout_s passed)
"""

from __future__ import annotations

import json


class ApiError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        return json.dumps(self.body()).encode()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(ApiError, ValueError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ApiError, PermissionError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="edgeship-agent"'
        if self.code == "invalid_api_key":
            challenge += ', error="invalid_token"'
        return {"WWW-Authenticate": challenge}


class Forbidden(ApiError, PermissionError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(ApiError, LookupError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class LengthRequired(ApiError, ValueError):
    status = 411
    type = "invalid_request_error"
    code = "length_required"


class PayloadTooLarge(ApiError, ValueError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(ApiError, ValueError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Overloaded(ApiError):
    status = 503
    type = "server_error"
    code = "overloaded"


class Timeout(ApiError, TimeoutError):
    status = 504
    type = "server_error"
    code = "timeout"
