"""Bundle uploads: a request body streamed to a file from a worker thread, within a size limit.

The limit is checked against Content-Length before anything is written, and again as bytes arrive
(a chunked upload declares no length). Past it the partial file is deleted and `UploadTooLarge`
(HTTP 413) names the limit and the setting that raises it. Writes never run on the event loop, so
a slow disk does not stall the API while a multi-GiB bundle arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import UploadTooLarge

FLUSH_BYTES = 1 << 20  # hand the worker thread 1 MiB at a time, not every 64 KiB chunk


@dataclass(frozen=True)
class UploadLimit:
    """The largest body the controller accepts; `setting` is where an operator raises it."""

    max_bytes: int
    setting: str = "max_upload_bytes"

    def check(self, size: int) -> None:
        if size > self.max_bytes:
            env = f"EDGESHIP_FLEET_{self.setting.upper()}"
            raise UploadTooLarge(f"bundle upload is larger than the controller's limit of {self.max_bytes:,} bytes "
                                 f"({self.setting}); raise it with {env} or {self.setting} in the config file")


async def receive(chunks: AsyncIterator[bytes], dest: Path, *, limit: UploadLimit, declared: int | None = None) -> int:
    """Write `chunks` to `dest` from a worker thread; returns the size. On any error `dest` is removed."""
    try:
        if declared is not None:
            limit.check(declared)
        f = await asyncio.to_thread(open, dest, "wb")
        try:
            size, pending = 0, bytearray()
            async for chunk in chunks:
                size += len(chunk)
                limit.check(size)
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    data, pending = pending, bytearray()
                    await asyncio.to_thread(f.write, data)
            await asyncio.to_thread(f.write, pending)
        finally:
            await asyncio.to_thread(f.close)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return size
