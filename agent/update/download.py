"""Bundle archive download over HTTP(S): Range resume, retries with backoff, bandwidth limit,
progress callbacks, sha256 check, and clear failures for 404/500/hangs/truncation/disk full.

`fetch_head` reads only the archive's first members (manifest.json and manifest.sig, which
`agent.bundle.pack` writes first) so the agent can check trust and compatibility before it
downloads the model itself.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import socket
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from typing import Callable

from agent.bundle.durable import fsync_dir
from agent.bundle.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME
from agent.update.crashpoint import crash_at_fraction
from agent.update.errors import Cancelled, DiskFull, DownloadError

CHUNK = 64 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class DownloadOptions:
    timeout_s: float = 30.0  # per socket operation: a server that hangs longer counts as failed
    retries: int = 4  # extra attempts after the first, over all URLs
    backoff_s: float = 1.0  # doubled after each failed attempt, capped at backoff_max_s
    backoff_max_s: float = 30.0
    limit_bps: int | None = None  # bandwidth limit in bytes/s; None = as fast as possible
    user_agent: str = "edgeship-agent"


def _request(url: str, opts: DownloadOptions, headers: dict[str, str]):
    req = urllib.request.Request(url, headers={"User-Agent": opts.user_agent, **headers})
    return urllib.request.urlopen(req, timeout=opts.timeout_s)  # noqa: S310 (http(s) checked by the command)


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."


def fetch_head(url: str, opts: DownloadOptions = DownloadOptions()) -> tuple[bytes, bytes]:
    """(manifest.json bytes, manifest.sig bytes) from the start of a bundle archive at `url`."""
    limit = MAX_MANIFEST_BYTES + 16 * 1024
    try:
        with _request(url, opts, {"Range": f"bytes=0-{limit - 1}"}) as resp:
            body = resp.read(limit)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"GET {_short(url)}: HTTP {exc.code} {exc.reason}", code=f"http_{exc.code}") from None
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        code = "download_timeout" if isinstance(reason, (TimeoutError, socket.timeout)) else "download_failed"
        raise DownloadError(f"GET {_short(url)}: {reason}", code=code) from None
    found: dict[str, bytes] = {}
    cut = False
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r|") as tar:
            for member in tar:
                if member.name in (MANIFEST_NAME, SIGNATURE_NAME) and member.isfile():
                    f = tar.extractfile(member)
                    data = f.read() if f else b""
                    if len(data) != member.size:
                        raise EOFError
                    found[member.name] = data
                if len(found) == 2:
                    break
    except EOFError:
        cut = True
    except tarfile.TarError as exc:  # junk says "invalid header"; a cut stream says "unexpected end"
        cut = "unexpected end" in str(exc) or bool(found)
    if len(found) < 2 and cut:
        raise DownloadError(f"{_short(url)} ended after {len(body)} bytes, inside the bundle's manifest",
                            code="download_truncated")
    if MANIFEST_NAME not in found:
        raise DownloadError(f"{_short(url)} does not start with a bundle manifest; is it an edgeship bundle .tar?",
                            code="not_a_bundle")
    return found[MANIFEST_NAME], found.get(SIGNATURE_NAME, b"")


def fetch_head_any(urls: list[str], opts: DownloadOptions = DownloadOptions(), *,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[bytes, bytes]:
    """`fetch_head` over the URLs with the same retries and backoff as `download` (a 404 drops a URL)."""
    live, delay = list(urls), opts.backoff_s
    last = DownloadError("no download URL given", code="no_url")
    for attempt in range(opts.retries + 1):
        if not live:
            break
        url = live[attempt % len(live)]
        try:
            return fetch_head(url, opts)
        except DownloadError as exc:
            last = exc
            if exc.code in ("http_403", "http_404", "http_410"):
                live.remove(url)
                continue
            if exc.code == "not_a_bundle":
                raise
        if attempt < opts.retries and live:
            sleep(delay)
            delay = min(delay * 2, opts.backoff_max_s)
    raise DownloadError(f"{last} (manifest request gave up after {opts.retries + 1} attempts)", code=last.code)


def _parse_total(resp, existing: int) -> tuple[int, int | None]:
    """(offset the body starts at, total size or None) from a 200/206 response."""
    if resp.status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m:
            raise DownloadError("server answered 206 without a valid Content-Range", code="download_failed")
        start, total = int(m[1]), (None if m[3] == "*" else int(m[3]))
        return start, total
    length = resp.headers.get("Content-Length")
    return 0, (int(length) if length and length.isdigit() else None)


def _throttle(started: float, sent: int, limit_bps: int | None) -> None:
    if limit_bps:
        ahead = sent / limit_bps - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


def _attempt(url: str, part: Path, opts: DownloadOptions, *, expected_size: int | None, max_size: int | None,
             progress: Progress | None, cancelled: Callable[[], bool] | None) -> int:
    """One GET (resuming from `part`'s size); returns the size on disk when the body ended."""
    existing = part.stat().st_size if part.exists() else 0
    if expected_size is not None and existing == expected_size:
        return existing
    headers = {"Range": f"bytes={existing}-"} if existing else {}
    with _request(url, opts, headers) as resp:
        start, total = _parse_total(resp, existing)
        if start not in (0, existing):
            raise DownloadError(f"server resumed at byte {start}, asked for {existing}", code="download_failed")
        total = total if total is not None else expected_size
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(f"{_short(url)} is {total} bytes, the command said {expected_size}",
                                code="size_mismatch")
        done, t0, sent = start, time.monotonic(), 0
        try:
            with open(part, "r+b" if start else "wb") as f:
                if start:
                    f.seek(start)
                    f.truncate()
                while chunk := resp.read(CHUNK):
                    if cancelled and cancelled():
                        raise Cancelled("download cancelled by a cancel command")
                    if expected_size is not None and done + len(chunk) > expected_size:
                        # no Content-Length (chunked or close-delimited): the size is only known here
                        raise DownloadError(f"{_short(url)} sent more than the {expected_size} bytes the command "
                                            "said; stopped there (is the URL the bundle's archive?)",
                                            code="download_too_large")
                    if expected_size is None and max_size is not None and done + len(chunk) > max_size:
                        raise DownloadError(f"{_short(url)} sent more than the {max_size} bytes an archive of its "
                                            "manifest can hold; stopped there (is the URL the bundle's archive?)",
                                            code="download_too_large")
                    f.write(chunk)
                    done += len(chunk)
                    sent += len(chunk)
                    if progress:
                        progress(done, total)
                    crash_at_fraction("download", done, total)
                    _throttle(t0, sent, opts.limit_bps)
                f.flush()
                os.fsync(f.fileno())
        except IncompleteRead:
            raise DownloadError(f"{_short(url)} ended after {done} of {total} bytes", code="download_truncated") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DiskFull(f"disk full while writing {part} after {done} bytes: {exc.strerror}") from None
            raise
        if total is not None and done < total:
            raise DownloadError(f"{_short(url)} ended after {done} of {total} bytes", code="download_truncated")
        return done


def download(urls: list[str], part: Path, *, expected_size: int | None = None, max_size: int | None = None,
             sha256: str | None = None,
             opts: DownloadOptions = DownloadOptions(), progress: Progress | None = None,
             cancelled: Callable[[], bool] | None = None, sleep: Callable[[float], None] = time.sleep) -> Path:
    """Download into `part` (resuming what is there) and return it once complete and checked.

    Tries the URLs in turn with exponential backoff; a 404 drops that URL for good. Raises
    DownloadError with a wire code (`http_404`, `http_500`, `download_timeout`,
    `download_truncated`, `download_too_large`, `sha256_mismatch`, ...), DiskFull or Cancelled.
    A body longer than `expected_size` is stopped as soon as it passes it, whether or not the
    server sent a Content-Length; without an expected size, `max_size` is the ceiling.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    live = list(urls)
    delay, last = opts.backoff_s, DownloadError("no download URL given", code="no_url")
    for attempt in range(opts.retries + 1):
        if not live:
            break
        url = live[attempt % len(live)]
        try:
            _attempt(url, part, opts, expected_size=expected_size, max_size=max_size, progress=progress,
                     cancelled=cancelled)
            break
        except (DiskFull, Cancelled):
            raise
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and part.exists():  # our partial file is longer than the resource
                part.unlink()
            last = DownloadError(f"GET {_short(url)}: HTTP {exc.code} {exc.reason}", code=f"http_{exc.code}")
            if exc.code in (403, 404, 410):
                live.remove(url)
                continue
        except DownloadError as exc:
            last = exc
            if exc.code == "download_too_large":
                part.unlink(missing_ok=True)  # not the archive the command named: keep none of it
            if exc.code in ("size_mismatch", "download_too_large"):
                raise
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            timeout = isinstance(reason, (TimeoutError, socket.timeout))
            last = DownloadError(f"GET {_short(url)}: {'timed out' if timeout else reason}",
                                 code="download_timeout" if timeout else "download_failed")
        if attempt < opts.retries and live:
            sleep(delay)
            delay = min(delay * 2, opts.backoff_max_s)
    else:
        raise DownloadError(f"{last} (gave up after {opts.retries + 1} attempts)", code=last.code)
    if not live and not (part.exists() and expected_size is not None and part.stat().st_size == expected_size):
        raise DownloadError(f"{last} (no URL left to try)", code=last.code)
    if expected_size is not None and part.stat().st_size != expected_size:
        raise DownloadError(f"downloaded {part.stat().st_size} bytes, expected {expected_size}",
                            code="download_truncated")
    fsync_dir(part.parent)  # the content is synced after each attempt; this makes its name durable too
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"downloaded archive sha256 {h.hexdigest()} != expected {sha256}",
                                code="sha256_mismatch")
    return part
