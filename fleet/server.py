"""`edgeship fleet serve`: database, engine thread, MQTT link and HTTP API in one process.

Run under systemd as a simple service (docs/FLEET.md has a unit); SIGTERM and SIGINT stop the
HTTP server, then the MQTT link, then the engine (which finishes its current batch), in that order.
"""

from __future__ import annotations

import logging
import signal
import threading

from fleet.config import FleetSettings

log = logging.getLogger("edgeship.fleet")


class Controller:
    """The assembled controller; `start()` brings up everything but HTTP, `serve()` blocks."""

    def __init__(self, settings: FleetSettings):
        from fleet.bundles import BundleStore
        from fleet.db import make_engine, migrate, sessions
        from fleet.mqtt import ControllerLink
        from fleet.rollout.engine import Engine

        self.settings = settings
        self.token = settings.token()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = make_engine(settings.db_url, schema=settings.database_schema)
        migrate(self.db)
        self.sessions = sessions(self.db)
        self.store = BundleStore(settings.bundles_dir, settings.trusted_keys)
        self.link: ControllerLink | None = None
        self.engine = Engine(
            self.sessions, topics=settings.topics, publish=self._publish, base_url=settings.base_url,
            tick_interval_s=settings.tick_interval_s, batch_max=settings.batch_max,
            resend_interval_s=settings.resend_interval_s, heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )
        self.link = ControllerLink.from_settings(settings, deliver=self.engine.deliver)

    def _publish(self, topic: str, payload: bytes) -> None:
        assert self.link is not None
        self.link.publish(topic, payload)

    def app(self):
        from fleet.api import create_app
        from fleet.upload import UploadLimit

        return create_app(engine=self.engine, store=self.store, token=self.token, sessions=self.sessions,
                          upload_dir=self.settings.data_dir / "uploads",
                          upload_limit=UploadLimit(self.settings.max_upload_bytes))

    def start(self) -> None:
        self.engine.start()
        assert self.link is not None
        self.link.start()

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
        self.engine.stop()
        self.db.dispose()

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT."""
        import uvicorn

        self.start()
        config = uvicorn.Config(self.app(), host=self.settings.http_host, port=self.settings.http_port,
                                log_level=self.settings.log_level.lower(), access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        log.info("edgeship fleet controller on http://%s:%s, broker %s, database %s", self.settings.http_host,
                 self.settings.http_port, self.settings.mqtt_url, self.db.url.render_as_string())
        try:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
            server.run()
        finally:
            self.stop()
