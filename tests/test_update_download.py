"""The downloader against a real HTTP server with faults: resume, retry, 404/500/hang/truncation,
disk full, bandwidth limit, progress, sha256, cancel, bodies without Content-Length."""

from __future__ import annotations

import hashlib
import os
import time

import pytest

from agent.update.download import DownloadOptions, download, fetch_head
from agent.update.errors import Cancelled, DiskFull, DownloadError
from tests.support.http import Fault, FileServer

FAST = DownloadOptions(timeout_s=1.0, retries=3, backoff_s=0.01)


@pytest.fixture
def server():
    srv = FileServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(300_000)
    p = tmp_path / "blob.tar"
    p.write_bytes(data)
    return p, data


def test_plain_download_with_progress_and_sha(server, blob, tmp_path):
    url = server.add("b", blob[0])
    seen = []
    part = download([url], tmp_path / "d" / "b.part", expected_size=len(blob[1]),
                    sha256=hashlib.sha256(blob[1]).hexdigest(), opts=FAST, progress=lambda d, t: seen.append((d, t)))
    assert part.read_bytes() == blob[1]
    assert seen[-1] == (len(blob[1]), len(blob[1])) and len(seen) > 2


def test_truncated_body_is_resumed_with_range(server, blob, tmp_path):
    url = server.add("b", blob[0])
    server.fault = Fault("truncate", times=1, at=100_000)
    part = download([url], tmp_path / "b.part", expected_size=len(blob[1]), opts=FAST)
    assert part.read_bytes() == blob[1]
    assert server.requests[-1][1] == "bytes=100000-"  # the second GET asked only for the rest


def test_always_truncated_fails_with_a_clear_code(server, blob, tmp_path):
    url = server.add("b", blob[0])
    server.ranges = False
    server.fault = Fault("truncate", at=1000)
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b.part", opts=FAST)
    assert err.value.code == "download_truncated" and "gave up after 4 attempts" in str(err.value)


def test_500_is_retried_with_backoff_then_succeeds(server, blob, tmp_path):
    url = server.add("b", blob[0])
    server.fault = Fault("500", times=2)
    sleeps = []
    download([url], tmp_path / "b.part", opts=FAST, sleep=sleeps.append)
    assert sleeps == [0.01, 0.02]


def test_500_forever_fails_http_500(server, blob, tmp_path):
    url = server.add("b", blob[0])
    server.fault = Fault("500")
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b.part", opts=FAST, sleep=lambda s: None)
    assert err.value.code == "http_500"


def test_404_drops_the_url_and_tries_the_next_mirror(server, blob, tmp_path):
    good = server.add("b", blob[0])
    missing = server.url("nope")
    assert download([missing, good], tmp_path / "b.part", opts=FAST).read_bytes() == blob[1]
    with pytest.raises(DownloadError) as err:
        download([missing], tmp_path / "c.part", opts=FAST)
    assert err.value.code == "http_404" and len([r for r in server.requests if r[0] == "/nope"]) == 2


def test_a_hanging_server_times_out(server, blob, tmp_path):
    url = server.add("b", blob[0])
    server.fault = Fault("hang", hang_s=5)
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b.part", opts=DownloadOptions(timeout_s=0.3, retries=1, backoff_s=0.01))
    assert err.value.code == "download_timeout"
    assert time.monotonic() - t0 < 4


def test_disk_full_mid_download_is_reported_not_retried(server, blob, tmp_path):
    url = server.add("b", blob[0])
    part = tmp_path / "b.part"
    os.symlink("/dev/full", part)  # the kernel answers every write with ENOSPC
    with pytest.raises(DiskFull) as err:
        download([url], part, opts=FAST)
    assert err.value.code == "disk_full" and "No space left" in str(err.value)
    assert len(server.requests) == 1


def test_bandwidth_limit_is_respected(server, blob, tmp_path):
    url = server.add("b", blob[0])
    t0 = time.monotonic()
    download([url], tmp_path / "b.part", opts=DownloadOptions(limit_bps=400_000))
    assert time.monotonic() - t0 >= 0.6  # 300 kB at 400 kB/s: at least 0.75 s, minus a first-chunk allowance


def test_wrong_sha256_is_refused_and_the_file_removed(server, blob, tmp_path):
    url = server.add("b", blob[0])
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b.part", sha256="0" * 64, opts=FAST)
    assert err.value.code == "sha256_mismatch" and not (tmp_path / "b.part").exists()


def test_cancel_stops_the_download(server, blob, tmp_path):
    url = server.add("b", blob[0])
    with pytest.raises(Cancelled):
        download([url], tmp_path / "b.part", opts=FAST, cancelled=lambda: True)


def test_size_mismatch_with_the_command_is_refused(server, blob, tmp_path):
    url = server.add("b", blob[0])
    with pytest.raises(DownloadError) as err:
        download([url], tmp_path / "b.part", expected_size=5, opts=FAST)
    assert err.value.code == "size_mismatch"


MiB = 1024 * 1024


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_a_body_without_content_length_is_stopped_at_the_expected_size(server, tmp_path, chunked):
    src = tmp_path / "one-mib.tar"
    src.write_bytes(os.urandom(MiB))
    url = server.add("b", src)
    server.fault = Fault("unsized", at=40 * MiB, chunked=chunked)  # the file, then 39 MiB more
    part = tmp_path / "b.part"
    on_disk: list[int] = []
    with pytest.raises(DownloadError) as err:
        download([url], part, expected_size=MiB, opts=FAST, progress=lambda d, t: on_disk.append(part.stat().st_size))
    assert err.value.code == "download_too_large" and f"more than the {MiB} bytes" in str(err.value)
    assert max(on_disk) <= MiB  # never a byte past the limit on disk
    assert not part.exists()  # and nothing of a resource that is not the archive kept
    assert len(server.requests) == 1  # not retried
    assert server.sent < 16 * MiB  # the socket was dropped, not read to the end (40 MiB)


@pytest.mark.parametrize("chunked", [False, True], ids=["close-delimited", "chunked"])
def test_a_body_without_content_length_of_the_expected_size_is_accepted(server, blob, tmp_path, chunked):
    url = server.add("b", blob[0])
    server.fault = Fault("unsized", chunked=chunked)
    part = download([url], tmp_path / "b.part", expected_size=len(blob[1]), opts=FAST)
    assert part.read_bytes() == blob[1]


def test_fetch_head_reads_only_the_manifest(server, tmp_path, keypair):
    from agent.bundle import pack
    from tests.support.bundles import make_bundle

    make_bundle(tmp_path / "bundle", keypair[0], extra_files={"big.bin": os.urandom(200_000)})
    url = server.add("b.tar", pack(tmp_path / "bundle", tmp_path / "b.tar"))
    raw, sig = fetch_head(url, FAST)
    assert raw == (tmp_path / "bundle" / "manifest.json").read_bytes() and b"ed25519" in sig
    assert server.requests[-1][1].startswith("bytes=0-")
    server.add("junk", blob_path := tmp_path / "junk")
    blob_path.write_bytes(b"x" * 2000)
    with pytest.raises(DownloadError) as err:
        fetch_head(server.url("junk"), FAST)
    assert err.value.code == "not_a_bundle"


def test_the_manifest_request_is_retried_like_the_download(server, tmp_path, keypair):
    from agent.bundle import pack
    from agent.update.download import fetch_head_any
    from tests.support.bundles import make_bundle

    make_bundle(tmp_path / "bundle", keypair[0])
    url = server.add("b.tar", pack(tmp_path / "bundle", tmp_path / "b.tar"))
    server.fault = Fault("500", times=2)
    sleeps = []
    raw, _ = fetch_head_any([server.url("gone"), url], FAST, sleep=sleeps.append)
    assert raw == (tmp_path / "bundle" / "manifest.json").read_bytes()
    assert len(sleeps) == 2  # each 500 backs off; the 404 drops its URL without waiting
    server.fault = Fault("500")
    with pytest.raises(DownloadError) as err:
        fetch_head_any([url], FAST, sleep=lambda s: None)
    assert err.value.code == "http_500" and "gave up after 4 attempts" in str(err.value)
