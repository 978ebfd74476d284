"""AgentService: `edgeship agent run`. Wires settings -> BundleStore -> active model -> ModelHost ->
ApiServer -> MqttLink -> UpdateManager, and runs the owner loop.

Threads:

    main (owner)   signals, commands, heartbeats, watchdog, state publishing: one inbox, one loop
    paho           MqttLink's network thread; hands parsed commands to the inbox
    api            the ApiServer's threads (inference)
    control        ControlServer: one thread per `edgeship agent install` conversation
    update worker  UpdateManager's own thread (publishes events through MqttLink.publish)

Start-up order: config (invalid -> exit 2 before anything is touched) -> state dir lock and store ->
update recovery -> load the active bundle (hashes and signature verified) -> API listening ->
control socket (local installs, agent/control.py) -> READY=1 -> MQTT (in the background;
inference never waits for the broker).

Errors: StartupError(RuntimeError) — the agent cannot start (state dir, keys, store); one line.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship import __version__
from agent.api import ApiServer
from agent.bundle import TrustedKeys
from agent.bundle.signing import KeyError_
from agent.config import AgentSettings, ConfigError, config_path, load_settings
from agent.control import ControlReply, ControlRequest, ControlServer, StateDirLock
from agent.facts import CpuMeter, Uptime, cpu_flags, device_facts, disk_free, meminfo, process_rss, temperature_c
from agent.link import MqttLink
from agent.liveness import InferenceProbe
from agent.protocol import AckMessage, BundleRef, HealthMessage, ReportCommand, StateMessage, UpdateState, WatchPolicy
from agent.runtime import ModelHost, load_model
from agent.runtime.batch_policy import BatchPolicy
from agent.systemd import Notifier
from agent.update.download import DownloadOptions
from agent.update.errors import StoreError
from agent.update.local import Step, clean_incoming, run_local_install
from agent.update.manager import UpdateConfig, UpdateManager
from agent.update.store import BundleStore

log = logging.getLogger("edgeship.agent")


class StartupError(RuntimeError):
    """The agent cannot start; the message says what to fix."""


@dataclass(frozen=True)
class _Connected:
    """The link is (re)connected and subscribed: publish the retained state."""


@dataclass(frozen=True)
class _StateChanged:
    """Something in the retained state changed (an update event)."""


def read_token(path: Path) -> str:
    """The bearer token in api.token_file (surrounding whitespace dropped); StartupError if unusable."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read api.token_file {path}: {getattr(exc, 'strerror', None) or exc}; "
                           "fix its path or permissions, or unset it") from None
    if not token or any(c.isspace() for c in token):
        raise StartupError(f"api.token_file {path} must hold one token without spaces; "
                           "e.g. write the output of `openssl rand -hex 32` into it")
    return token


def bundle_ref(vb: Any) -> BundleRef | None:
    if vb is None:
        return None
    return BundleRef(name=vb.manifest.name, version=vb.manifest.version, manifest_sha256=vb.manifest_sha256)


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        # journald stamps the time; a terminal user can read the order.
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("edgeship").setLevel(level)


class AgentService:
    """The device service. `run()` blocks until SIGTERM/SIGINT and returns the exit code."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        reload: Callable[[], AgentSettings] | None = None,
        notifier: Notifier | None = None,
    ):
        self.settings = settings
        self._reload = reload
        self.notifier = notifier or Notifier()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # SimpleQueue.put is safe in signal handlers
        self.uptime = Uptime()
        self.cpu = CpuMeter()
        self.host = ModelHost()
        self.store = None
        self.api = None
        self.link: MqttLink | None = None
        self.manager = None
        self.probe: InferenceProbe | None = None
        self.facts = None
        self.trusted = TrustedKeys([])
        self.lock: StateDirLock | None = None
        self.control: ControlServer | None = None

    # ---- start-up -----------------------------------------------------------------------------

    def _open_store(self) -> None:
        s = self.settings
        try:
            s.state_dir.mkdir(parents=True, exist_ok=True)
            probe = s.state_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StartupError(f"state_dir {s.state_dir} is not writable ({exc.strerror}); "
                               "fix its permissions or set state_dir") from None
        lock = StateDirLock(s.state_dir)
        if not lock.acquire():
            raise StartupError(f"state_dir {s.state_dir} is in use by another edgeship process (an agent, or an "
                               f"`edgeship agent install` in progress); stop it or wait, then start again")
        self.lock = lock
        try:
            self.trusted = TrustedKeys.from_paths(s.trusted_keys)
        except KeyError_ as exc:
            raise StartupError(f"trusted_keys: {exc}") from None
        if not len(self.trusted):
            log.warning("no trusted_keys configured: every deploy will be refused until one is added")
        try:
            self.store = BundleStore(s.state_dir, trusted=self.trusted)
        except (StoreError, OSError) as exc:
            raise StartupError(f"bundle store in {s.state_dir}: {exc}") from None

    def _has_active_bundle(self) -> bool:
        try:
            return self.store.active_sha() is not None
        except StoreError:
            return True  # recovery decides what to do; the probe is no place to fail

    def _start_updates(self) -> None:
        """The update manager finishes or undoes an interrupted update and loads the active bundle."""
        config = update_config(self.settings, session=self.link.session, facts=self.facts)
        self.manager = UpdateManager(config=config, store=self.store, host=self.host, publish=self._publish,
                                     trusted=self.trusted, load=load_model,  # it checks every hash first
                                     on_state_change=lambda: self.inbox.put(_StateChanged()))
        try:
            self.manager.recover()
        except Exception as exc:
            # Active and previous bundle both damaged (recover() fell back to the previous if it could):
            # serving nothing beats crash-looping: /readyz says not ready, the state shows no model.
            log.error("cannot load the active bundle: %s", exc)
        clean_incoming(self.settings.state_dir, keep_urls=self.manager.pending_urls)
        model = self.host.current
        if model is not None:
            log.info("serving %s on %s with %d threads", model.ref, model.execution_provider, model.threads)
        elif self.store.active_sha() is None:
            log.info("no bundle installed yet; waiting for a deploy")

    def _start_api(self) -> None:
        a = self.settings.api
        self.api = ApiServer(
            self.host,
            host_addr=a.host or "127.0.0.1",
            port=a.port,
            unix_socket=a.unix_socket,
            queue_size=a.queue_size,
            request_timeout_s=a.request_timeout_s,
            max_connections=a.max_connections,
            read_timeout_s=a.read_timeout_s,
            allowed_hosts=a.allowed_hosts,
            token=read_token(a.token_file) if a.token_file is not None else None,
            max_body_bytes=a.max_body_bytes,
            slots=a.max_batch,
        )
        try:
            self.api.start()
        except OSError as exc:
            self.api = None
            raise StartupError(f"cannot listen on api.bind {a.bind!r}: {exc.strerror or exc}") from None

    def _start_probe(self) -> None:
        """Only under a systemd watchdog: nothing else reads the probe, so no inference is spent on it."""
        if self.notifier.watchdog_interval_s is None:
            return
        api = self.api
        self.probe = InferenceProbe(self.host, admit=lambda deadline: api.admission.enter(deadline=deadline),
                                    policy=self.settings.liveness.policy())
        self.probe.start()

    def _watchdog(self) -> None:
        """WATCHDOG=1 only while the API listens and inference answers; otherwise systemd restarts us."""
        if self.api is not None and not self.api.listening:
            log.error("the API server thread died; withholding WATCHDOG=1 so systemd restarts the agent")
        elif self.probe is not None and not self.probe.answers():
            log.error("inference has not answered for over %g s (wedged runtime?); withholding WATCHDOG=1 "
                      "so systemd restarts the agent", self.probe.policy.max_silence_s)
        else:
            self.notifier.watchdog()

    def _start_control(self) -> None:
        self.control = ControlServer(self.settings.state_dir, self._on_control)
        try:
            self.control.start()
        except OSError as exc:
            self.control = None
            raise StartupError(f"cannot open the control socket in {self.settings.state_dir}: {exc}") from None

    def _on_control(self, req: ControlRequest, fds: list[int], send: Any) -> None:
        """A local `edgeship agent install` (control thread): the same manager as a fleet deploy."""
        if len(fds) != 1:
            send(ControlReply(ok=False, final=True, code="bad_request", reason="install needs the archive's file descriptor"))
            return
        with open(fds.pop(), "rb") as src:
            log.info("local install requested%s", " (downgrade allowed)" if req.allow_downgrade else "")
            final = run_local_install(self.manager, src, size=os.fstat(src.fileno()).st_size,
                                      device_id=self.settings.device_id, allow_downgrade=req.allow_downgrade,
                                      replaces=tuple(req.replaces),
                                      watch=None, stop_at=frozenset({UpdateState.WATCHING}),
                                      emit=lambda step: send(_reply(step)))
        log.info("local install: %s%s", final.state or final.code, f" ({final.reason})" if final.reason else "")
        send(_reply(final))

    # ---- what the device says -----------------------------------------------------------------

    def state_message(self) -> StateMessage:
        model = self.host.current
        try:
            slots = self.manager.snapshot() if self.manager is not None else {}
        except Exception as exc:  # a damaged store must not stop the device from reporting
            log.error("cannot read the bundle store for the state: %s", exc)
            slots = {}
        return StateMessage(
            device_id=self.settings.device_id, session="-", seq=0, agent_version=__version__,
            facts=self.facts, labels=self.settings.labels, **slots,
            execution_provider=model.execution_provider if model is not None else None,
        )

    def health_message(self) -> HealthMessage:
        mem = meminfo()
        model = self.host.current
        update = self.manager.status if self.manager is not None else None
        if self.api is not None:
            self.host.stats.queue_depth = self.api.admission.depth
        return HealthMessage(
            device_id=self.settings.device_id, session="-", seq=0,
            uptime_s=self.uptime.seconds(), cpu_percent=self.cpu.percent(), rss_bytes=process_rss(),
            mem_available_bytes=mem.get("MemAvailable"), disk_free_bytes=disk_free(self.settings.state_dir),
            temperature_c=temperature_c(),
            active=bundle_ref(model.bundle) if model is not None else None,
            update_state=update.state if update is not None else UpdateState.IDLE,
            inference=self.host.stats.snapshot_and_reset(),
        )

    def _publish(self, msg: Any) -> None:
        """UpdateManager's publish (any thread): the link stamps session and seq."""
        if self.link is not None:
            self.link.publish(msg)

    def status_line(self) -> str:
        model = self.host.current
        serving = f"serving {model.ref} on {model.execution_provider}" if model else "no model"
        broker = "broker connected" if self.link and self.link.connected else "broker offline"
        return f"{serving}; {broker}"

    # ---- the owner loop -----------------------------------------------------------------------

    def _handle_command(self, cmd: Any) -> None:
        try:
            result = self.manager.handle(cmd)  # answers at once; updates run on its worker thread
        except Exception as exc:  # the loop must survive any one command
            log.exception("update manager failed on command %s", cmd.id)
            result = AckMessage(device_id=self.settings.device_id, session="-", seq=0, command_id=cmd.id,
                                accepted=False, code="internal_error", reason=f"{type(exc).__name__}: {exc}"[:500])
        self.link.publish(result)
        if isinstance(cmd, ReportCommand):  # the manager re-publishes the state; add a fresh heartbeat
            self.link.publish(self.health_message())

    def _reload_settings(self) -> None:
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = self._reload() if self._reload else self.settings
        except ConfigError as exc:
            for line in exc.lines:
                log.error("reload refused, keeping the running config: %s", line)
            self.notifier.send("READY=1", f"STATUS={self.status_line()} (reload refused: bad config)")
            return
        # Only these change live; the rest needs a restart (and says so).
        live = {"labels", "heartbeat_interval_s", "log_level"}
        needs_restart = sorted(k for k in new.model_fields if k not in live and getattr(new, k) != getattr(self.settings, k))
        self.settings = self.settings.model_copy(update={k: getattr(new, k) for k in live})
        configure_logging(self.settings.log_level)
        if needs_restart:
            log.warning("config reloaded; changes to %s take effect after a restart", ", ".join(needs_restart))
        log.info("config reloaded: labels=%s heartbeat=%ss log_level=%s", self.settings.labels,
                 self.settings.heartbeat_interval_s, self.settings.log_level)
        self.link.publish(self.state_message())
        self.notifier.send("READY=1", f"STATUS={self.status_line()}")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.inbox.put(signal.Signals(signum))

    def run(self) -> int:
        """Start everything, loop until SIGTERM/SIGINT, shut down cleanly. Returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.notifier.status("starting")
        try:
            self._open_store()
            # With nothing to serve, a child process probes onnxruntime: ~30 MB stay out until a model loads.
            self.facts = device_facts(isolate_onnxruntime=not self._has_active_bundle())
            # Built before the update manager so what recovery publishes is buffered, sent on connect.
            self.link = MqttLink(self.settings.broker, device_id=self.settings.device_id,
                                 on_command=self.inbox.put, on_connected=lambda: self.inbox.put(_Connected()))
            self._start_updates()
            self._start_api()
            self._start_probe()
            self._start_control()
        except BaseException:
            self.link = None  # never started: nothing to say goodbye on
            self._shutdown()
            raise
        self.link.start()
        self.notifier.ready(self.status_line())
        log.info("ready: %s; device %s", self.status_line(), self.settings.device_id)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _loop(self) -> None:
        now = time.monotonic()
        next_beat = now + self.settings.heartbeat_interval_s
        wd = self.notifier.watchdog_interval_s
        next_wd = now + wd if wd else float("inf")
        while True:
            timeout = max(0.0, min(next_beat, next_wd) - time.monotonic())
            try:
                item = self.inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            if item is signal.SIGTERM or item is signal.SIGINT:
                log.info("%s: shutting down", item.name)
                return
            if item is signal.SIGHUP:
                self._reload_settings()
                next_beat = min(next_beat, time.monotonic() + self.settings.heartbeat_interval_s)
            elif isinstance(item, (_Connected, _StateChanged)):
                self.link.publish(self.state_message())
                self.notifier.status(self.status_line())
            elif item is not None:
                self._handle_command(item)
            now = time.monotonic()
            if now >= next_beat:
                self.link.publish(self.health_message())
                next_beat = now + self.settings.heartbeat_interval_s
            if now >= next_wd:
                self._watchdog()
                next_wd = now + wd

    def _shutdown(self) -> None:
        self.notifier.stopping("draining requests")
        if self.probe is not None:
            self.probe.stop()
        if self.control is not None:
            self.control.stop()
        if self.api is not None:
            self.api.stop(self.settings.api.drain_timeout_s)
        if self.manager is not None:
            self.manager.close()
        if self.link is not None:
            sent = self.link.stop()
            log.info("offline state %s", "published" if sent else "not published (broker unreachable)")
        model = self.host.swap(None)
        if model is not None:
            model.close()
        if self.lock is not None:
            self.lock.release()


def _reply(step: Step) -> ControlReply:
    return ControlReply(state=step.state, ok=step.ok, final=step.final, code=step.code, reason=step.reason,
                        bundle=step.bundle)


def update_config(s: AgentSettings, *, session: str, facts: Any) -> UpdateConfig:
    """The update manager's configuration from the agent settings and the device's facts."""
    return UpdateConfig(
        state_dir=s.state_dir,
        device_id=s.device_id,
        agent_version=__version__,
        session=session,
        arch=facts.arch,
        execution_providers=tuple(facts.execution_providers),
        cpu_features=cpu_flags() or None,
        providers=s.runtime.providers or None,
        threads=s.runtime.threads or None,
        spin=s.runtime.spin_wait,
        huge_pages=s.runtime.huge_pages,
        batching=BatchPolicy(max_batch=s.api.max_batch, kv_cache_mb=s.runtime.kv_cache_mb,
                             prefix_cache_mb=s.runtime.prefix_cache_mb),
        default_watch=WatchPolicy(**s.watch.model_dump()),
        bundle_names=tuple(s.bundle_names),
        drain_timeout_s=s.api.drain_timeout_s,
        download=DownloadOptions(timeout_s=s.download.timeout_s, retries=s.download.retries,
                                 limit_bps=s.download.limit_bps or None),
    )


def run_agent(config: Path | None, overrides: dict[str, Any]) -> int:
    """`edgeship agent run`: load the config (exit 2 on any bad field), then run the service."""
    settings = load_settings(config, overrides)  # ConfigError is printed by the CLI
    configure_logging(settings.log_level)
    path, _ = config_path(config)
    log.info("config: %s%s; device %s", path, "" if path.is_file() else " (absent: defaults, environment and options only)",
             settings.device_id)
    service = AgentService(settings, reload=lambda: load_settings(config, overrides))
    return service.run()
