"""An embedded MQTT broker (amqtt) on 127.0.0.1:PORT, for machines without Mosquitto.

    python -m edgeship.embedded_broker PORT

Loopback only and anonymous: for a local demo, never for a fleet (configs/mosquitto/ is that).
"""

from __future__ import annotations

import asyncio
import sys


async def serve(port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                     "sys_interval": 0, "auth": {"allow-anonymous": True}})
    await broker.start()
    await asyncio.Event().wait()


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m edgeship.embedded_broker PORT")
    try:
        import amqtt  # noqa: F401
    except ImportError:
        sys.exit("the embedded broker needs amqtt: pip install amqtt (or install mosquitto)")
    asyncio.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
