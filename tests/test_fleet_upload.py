"""Bundle uploads on the controller: streamed to disk from a worker thread, within the size limit."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from fleet.errors import UploadTooLarge
from fleet.upload import UploadLimit, receive

CHUNK = 64 * 1024


async def _chunks(n: int):
    for i in range(n):
        yield bytes([i % 256]) * CHUNK
        await asyncio.sleep(0)


def test_a_slow_disk_never_stalls_the_event_loop(tmp_path):
    """The destination is a FIFO whose reader starts late and reads slowly (a real slow sink): while
    every write waits on it, the event loop keeps serving other work."""
    disk = tmp_path / "slow-disk"
    os.mkfifo(disk)
    received = bytearray()

    def slow_reader() -> None:
        time.sleep(1.5)
        with open(disk, "rb") as f:
            while data := f.read(CHUNK):
                received.extend(data)
                time.sleep(0.005)

    async def main() -> tuple[int, float]:
        gaps, last = [0.0], time.monotonic()

        async def ticker() -> None:
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        task = asyncio.create_task(ticker())
        size = await receive(_chunks(64), disk, limit=UploadLimit(1 << 30))
        task.cancel()
        return size, max(gaps)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    size, worst_gap = asyncio.run(main())
    reader.join(10)
    assert size == 64 * CHUNK and len(received) == size
    assert worst_gap < 0.75, f"the event loop stalled for {worst_gap:.2f}s while the upload waited on the disk"


@pytest.mark.parametrize("declared", [None, 10 * CHUNK])
def test_past_the_limit_nothing_is_kept(tmp_path, declared):
    dest = tmp_path / "upload.tar"
    dest.touch()  # as the API's mkstemp leaves it
    limit = UploadLimit(3 * CHUNK + 1)
    with pytest.raises(UploadTooLarge, match=r"limit of 196,609 bytes \(max_upload_bytes\); raise it with "
                                             r"EDGESHIP_FLEET_MAX_UPLOAD_BYTES"):
        asyncio.run(receive(_chunks(10), dest, limit=limit, declared=declared))
    assert not dest.exists()
    assert asyncio.run(receive(_chunks(3), dest, limit=limit)) == 3 * CHUNK and dest.stat().st_size == 3 * CHUNK
