"""Who may talk to the local API, and what a request body may look like: pure checks on headers.

A web page open in a browser on the device must not be able to drive the API (DNS rebinding,
cross-site POSTs), and a request must not be able to make the agent read without bound:

- Host names this agent: a loopback name or address (`localhost`, `*.localhost`, 127.0.0.0/8, ::1),
  the bound address, any IP literal when bound to a wildcard address, or one of `api.allowed_hosts`.
  A DNS-rebinding page can only send a name its attacker controls. Not checked on a Unix socket.
- Origin, when sent, is this same origin (host and port of the Host header); Sec-Fetch-Site, when
  sent, is `same-origin` or `none`. Browsers send one of them on every cross-origin request.
- With a token configured: `Authorization: Bearer <token>` on every route but /healthz.
- A body is application/json (or `+json`): text/plain, forms and multipart are what a page may POST
  cross-origin without a preflight. It has a Content-Length of at most `max_body_bytes`;
  Transfer-Encoding (chunked) is refused, so the body's end is never a matter of interpretation.

Every check raises an `agent.api.errors.ApiError` saying what was wrong and what to send instead.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent.api.errors import BadRequest, Forbidden, LengthRequired, PayloadTooLarge, Unauthorized, \
    UnsupportedMediaType

MAX_BODY_BYTES = 4 << 20
OPEN_PATHS = frozenset({"/healthz"})  # liveness needs no token
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Headers:
    """The request's headers, lower-cased names, every value kept (a repeated header is refused)."""

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._values: dict[str, list[str]] = {}
        for name, value in raw:
            self._values.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))

    def one(self, name: str) -> str | None:
        values = self._values.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest(f"the request has {len(values)} {name} headers; send one", code="duplicate_header")
        return values[0]

    def __contains__(self, name: str) -> bool:
        return name in self._values


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _host_port(value: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + value.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.path or parts.query or parts.username is not None:
        raise BadRequest(f"Host {value!r} is not a host[:port]; send Host: 127.0.0.1:<port>", code="invalid_host")
    return parts.hostname.lower(), port


@dataclass(frozen=True)
class Guard:
    """The checks of one server; `bound_host` None means a Unix socket (no Host check)."""

    bound_host: str | None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    token: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", frozenset(h.strip().lower().strip("[]") for h in self.allowed_hosts))
        if self.token is not None and not self.token:
            raise ValueError("the API token is empty; put a secret in api.token_file or unset it")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes={self.max_body_bytes} must be >= 1")

    # ---- who ----------------------------------------------------------------------------------

    def admit(self, path: str, headers: Headers) -> None:
        """Host, then Origin / Sec-Fetch-Site, then the token; raises Forbidden, Unauthorized, BadRequest."""
        host = headers.one("host")
        if self.bound_host is not None:
            self._check_host(host)
        self._check_origin(headers.one("origin"), host, headers.one("sec-fetch-site"))
        if self.token is not None and path not in OPEN_PATHS:
            self._check_token(headers.one("authorization"))

    def host_allowed(self, name: str) -> bool:
        if name in self.allowed_hosts or name == "localhost" or name.endswith(".localhost"):
            return True
        ip = _ip(name)
        if ip is None:
            return False
        bound = (self.bound_host or "").strip("[]").lower()
        return ip.is_loopback or name == bound or bound in _WILDCARDS

    def _check_host(self, host: str | None) -> None:
        if host is None:
            return  # HTTP/1.0 without Host: no browser sends that
        name, _ = _host_port(host)
        if not self.host_allowed(name):
            extra = f", {', '.join(sorted(self.allowed_hosts))}" if self.allowed_hosts else ""
            raise Forbidden(f"Host {host!r} is not this agent (accepted: localhost, loopback addresses, "
                            f"{self.bound_host}{extra}); if a name or proxy really points here, add it to "
                            "api.allowed_hosts", code="host_not_allowed")

    @staticmethod
    def _check_origin(origin: str | None, host: str | None, fetch_site: str | None) -> None:
        if fetch_site is not None and fetch_site.strip().lower() not in ("same-origin", "none"):
            raise Forbidden(f"cross-origin browser requests are refused (Sec-Fetch-Site: {fetch_site}); call the "
                            "API from a program on the device, not from a web page", code="cross_origin")
        if origin is None:
            return
        parts = urlsplit(origin.strip().lower())
        same = False
        if host is not None and parts.scheme in _DEFAULT_PORTS and parts.hostname:
            try:
                origin_port = parts.port or _DEFAULT_PORTS[parts.scheme]
                name, port = _host_port(host)
            except (ValueError, BadRequest):
                origin_port, name, port = -1, "", None
            same = parts.hostname == name and origin_port == (port or _DEFAULT_PORTS[parts.scheme])
        if not same:
            raise Forbidden(f"Origin {origin!r} is not this agent's origin (Host {host!r}); cross-origin browser "
                            "requests are refused: call the API from a program on the device", code="cross_origin")

    def _check_token(self, authorization: str | None) -> None:
        assert self.token is not None
        if authorization is None:
            raise Unauthorized("this agent needs a bearer token: send Authorization: Bearer <the secret in "
                               "api.token_file> (the openai client's api_key)", code="missing_api_key")
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise Unauthorized("the bearer token is wrong; send Authorization: Bearer <the secret in api.token_file>",
                               code="invalid_api_key")

    # ---- what ---------------------------------------------------------------------------------

    def body_length(self, headers: Headers) -> int:
        """The Content-Length of a JSON body this server will read, or the reason it will not."""
        kind = headers.one("content-type")
        media = (kind or "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            got = f"Content-Type {kind!r} is" if kind else "a body without Content-Type is"
            raise UnsupportedMediaType(f"{got} not accepted; send JSON with Content-Type: application/json")
        if "transfer-encoding" in headers:
            raise LengthRequired(f"Transfer-Encoding {headers.one('transfer-encoding')!r} is not accepted; send the "
                                 "body with a Content-Length")
        length = headers.one("content-length")
        if length is None:
            raise BadRequest("the request has no Content-Length; send a JSON body", code="missing_body")
        if not length.strip().isdigit():
            raise BadRequest(f"Content-Length {length!r} is not a non-negative number", code="invalid_length")
        n = int(length)
        if n > self.max_body_bytes:
            raise PayloadTooLarge(f"the body is {n} bytes, over the {self.max_body_bytes} byte limit")
        return n
