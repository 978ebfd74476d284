"""Errors raised while loading or running a model.

    RuntimeError_(RuntimeError)          .code is a stable reason code (wire, HTTP)
    ├── LoadError                        the bundle cannot be turned into a session
    │   └── ProviderUnavailable          no execution provider of the bundle's list can be had
    ├── WrongTask                        e.g. generate() on an embedding bundle
    ├── InputError(ValueError too)       bad request: prompt over the context, bad sampling value
    │   └── ConstraintError              response_format / tools: does not compile, too large, or
    │                                    unsatisfiable while decoding (codes invalid_constraint,
    │                                    constraint_unsatisfiable)
    ├── NoModelLoaded                    the host serves nothing yet
    └── Cancelled                        the caller cancelled (client gone, timeout, shutdown)
"""

from __future__ import annotations


class RuntimeError_(RuntimeError):
    code = "runtime_error"


class LoadError(RuntimeError_):
    code = "load_failed"


class ProviderUnavailable(LoadError):
    code = "provider_unavailable"


class WrongTask(RuntimeError_):
    code = "wrong_task"


class InputError(RuntimeError_, ValueError):
    code = "invalid_input"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code:
            self.code = code


class ConstraintError(InputError):
    code = "invalid_constraint"


class Cancelled(RuntimeError_):
    code = "cancelled"


class NoModelLoaded(RuntimeError_):
    code = "model_not_loaded"
