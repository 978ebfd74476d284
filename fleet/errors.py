"""The controller's errors. Each carries the bad value and what to do, and maps to an HTTP status.

    FleetError(Exception)                 .status: the HTTP status the API answers with
    ├── ConfigError(ValueError)           settings that cannot work (400 never reaches HTTP)
    ├── InvalidRequest(ValueError)        a bad value in a request (400)
    │   ├── BundleRejected                signature, hashes or archive refused (422)
    │   └── UploadTooLarge                an upload past max_upload_bytes (413)
    ├── NotFound(LookupError)             no such device, bundle or rollout (404)
    ├── Conflict(RuntimeError)            refused in the current state (409)
    │   └── TransitionError               a rollout event its state does not allow
    └── Unauthorized(PermissionError)     missing or wrong bearer token (401)
"""

from __future__ import annotations


class FleetError(Exception):
    status = 500
    code = "internal"


class ConfigError(FleetError, ValueError):
    status = 400
    code = "config_invalid"


class InvalidRequest(FleetError, ValueError):
    status = 400
    code = "invalid_request"


class BundleRejected(InvalidRequest):
    status = 422
    code = "bundle_rejected"


class UploadTooLarge(InvalidRequest):
    status = 413
    code = "upload_too_large"


class NotFound(FleetError, LookupError):
    status = 404
    code = "not_found"


class Conflict(FleetError, RuntimeError):
    status = 409
    code = "conflict"


class TransitionError(Conflict):
    code = "invalid_transition"


class Unauthorized(FleetError, PermissionError):
    status = 401
    code = "unauthorized"
