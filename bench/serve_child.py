"""The agent's runtime + API as a process of its own (no torch, no numpy until a model loads),
for agent_speed.py's idle RSS, loaded RSS and start-to-ready numbers. Prints its port, then serves."""

from __future__ import annotations

import time
from pathlib import Path


def main(argv: list[str]) -> None:
    from agent.api import ApiServer
    from agent.runtime import ModelHost

    host = ModelHost()
    server = ApiServer(host, port=0)
    server.start()
    print(server.port, flush=True)
    if argv:
        from agent.bundle import TrustedKeys, open_bundle
        from agent.runtime import load_model

        host.swap(load_model(open_bundle(Path(argv[0]), TrustedKeys.from_paths([Path(argv[1])]))))
    while True:
        time.sleep(3600)
