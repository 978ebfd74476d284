"""Agent configuration: source order, the example file, and one error line per bad field."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.config import AgentSettings, ConfigError, load_settings, machine_id, merge, parse_override

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "agent.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EDGESHIP_AGENT_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def agent_cmd(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_AGENT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "edgeship.cli", "agent", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


def test_example_file_holds_every_default(tmp_path):
    from_example = load_settings(EXAMPLE, {"device_id": "d1"})
    from_nothing = load_settings(write(tmp_path, ""), {"device_id": "d1"})
    assert from_example == from_nothing
    text = EXAMPLE.read_text()
    # every option is in the example, set or commented out
    for name, field in AgentSettings.model_fields.items():
        assert name in text, name
        sub = getattr(field.annotation, "model_fields", None)
        for key in sub or {}:
            assert f"{key} =" in text, f"{name}.{key} is not in configs/agent.toml"
    tomllib.loads(text)  # and it parses


def test_order_cli_over_env_over_file_over_defaults(tmp_path, monkeypatch):
    cfg = write(tmp_path, 'device_id = "from-file"\nheartbeat_interval_s = 5\n'
                          '[broker]\nurl = "mqtt://10.0.0.1:1883"\nkeepalive_s = 40\n')
    s = load_settings(cfg)
    assert (s.device_id, s.heartbeat_interval_s, s.broker.url, s.broker.keepalive_s) == ("from-file", 5, "mqtt://10.0.0.1:1883", 40)
    assert s.api.queue_size == 8  # default
    monkeypatch.setenv("EDGESHIP_AGENT_DEVICE_ID", "from-env")
    monkeypatch.setenv("EDGESHIP_AGENT_BROKER__URL", "mqtts://10.0.0.2")
    s = load_settings(cfg)
    assert (s.device_id, s.broker.url, s.broker.keepalive_s) == ("from-env", "mqtts://10.0.0.2", 40)  # nested merge
    assert s.broker.port == 8883 and s.broker.tls
    s = load_settings(cfg, {"device_id": "from-cli", "broker": {"keepalive_s": "50"}})
    assert (s.device_id, s.broker.url, s.broker.keepalive_s) == ("from-cli", "mqtts://10.0.0.2", 50)


def test_config_file_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESHIP_AGENT_CONFIG", str(write(tmp_path, 'device_id = "via-env-path"\n')))
    assert load_settings().device_id == "via-env-path"
    monkeypatch.setenv("EDGESHIP_AGENT_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_labels_and_keys_from_env_strings(tmp_path, monkeypatch):
    key = write(tmp_path, "not checked here", "k.pub")
    monkeypatch.setenv("EDGESHIP_AGENT_LABELS", "site=berlin, line=3")
    monkeypatch.setenv("EDGESHIP_AGENT_TRUSTED_KEYS", f"{key},{key}")
    s = load_settings(write(tmp_path, ""), {"device_id": "d"})
    assert s.labels == {"site": "berlin", "line": "3"}
    assert s.trusted_keys == [key, key]
    monkeypatch.setenv("EDGESHIP_AGENT_LABELS", '{"hardware": "rk3588"}')
    assert load_settings(write(tmp_path, ""), {"device_id": "d"}).labels == {"hardware": "rk3588"}


def test_device_id_defaults_to_machine_id(tmp_path):
    mid = machine_id()
    if mid is None:
        with pytest.raises(ConfigError, match="machine-id"):
            load_settings(write(tmp_path, ""))
    else:
        assert load_settings(write(tmp_path, "")).device_id == mid


def test_api_bind_forms(tmp_path):
    s = load_settings(write(tmp_path, '[api]\nbind = "unix:/run/edgeship/api.sock"\n'), {"device_id": "d"})
    assert s.api.unix_socket == Path("/run/edgeship/api.sock")
    s = load_settings(write(tmp_path, '[api]\nbind = "[::1]:9000"\n'), {"device_id": "d"})
    assert (s.api.host, s.api.port, s.api.unix_socket) == ("::1", 9000, None)


def test_api_body_limit_is_a_setting(tmp_path):
    assert load_settings(write(tmp_path, ""), {"device_id": "d"}).api.max_body_bytes == 4 << 20
    s = load_settings(write(tmp_path, '[api]\nmax_body_bytes = 65536\n'), {"device_id": "d"})
    assert s.api.max_body_bytes == 65536
    with pytest.raises(ConfigError, match="api.max_body_bytes"):
        load_settings(write(tmp_path, '[api]\nmax_body_bytes = 12\n'), {"device_id": "d"})


def test_prefix_cache_budget_is_a_setting_that_reaches_the_update_manager(tmp_path):
    from types import SimpleNamespace

    from agent.service import update_config

    facts = SimpleNamespace(arch="x86_64", execution_providers=["CPUExecutionProvider"])
    s = load_settings(write(tmp_path, ""), {"device_id": "d"})
    assert s.runtime.prefix_cache_mb == 256
    assert update_config(s, session="s", facts=facts).batching.prefix_cache_mb == 256
    s = load_settings(write(tmp_path, '[runtime]\nprefix_cache_mb = 0\n'), {"device_id": "d"})
    assert update_config(s, session="s", facts=facts).batching.prefix_cache_mb == 0
    with pytest.raises(ConfigError, match="runtime.prefix_cache_mb"):
        load_settings(write(tmp_path, '[runtime]\nprefix_cache_mb = -1\n'), {"device_id": "d"})


def test_every_bad_field_is_one_line(tmp_path):
    cfg = write(tmp_path, """
device_id = "bad/id"
labels = "site"
heartbeat_interval_s = 0
log_level = "LOUD"
[broker]
url = "http://broker:1883"
password = "hunter2"
kepalive_s = 10
[api]
bind = "0.0.0.0:99999"
""")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    lines = info.value.lines
    by_path = {line.split(": ")[1]: line for line in lines}
    assert set(by_path) == {"device_id", "labels", "heartbeat_interval_s", "log_level",
                            "broker.url", "broker.kepalive_s", "api.bind"}, lines
    assert "'bad/id'" in by_path["device_id"]
    assert "'http://broker:1883'" in by_path["broker.url"] and "mqtt://" in by_path["broker.url"]
    assert "unknown option" in by_path["broker.kepalive_s"]
    # a section's cross-field rules are checked once its fields are valid
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, '[broker]\npassword = "hunter2"\ncert_file = "/etc/hostname"\n'), {"device_id": "d"})
    (line,) = info.value.lines
    assert line.startswith("config error: broker: ") and "cert_file and key_file go together" in line
    assert "hunter2" not in line  # secrets are never printed


def test_set_override_parsing():
    assert merge(parse_override("broker.url=mqtt://x"), parse_override("broker.keepalive_s=9")) == {
        "broker": {"url": "mqtt://x", "keepalive_s": "9"}}
    with pytest.raises(ConfigError, match="dotted.path=value"):
        parse_override("broker.url")


# ---- through the real command -----------------------------------------------------------------


def test_invalid_config_exits_before_touching_anything(tmp_path):
    state = tmp_path / "state"
    cfg = write(tmp_path, f'state_dir = "{state}"\nheartbeat_interval_s = -1\n[broker]\nurl = "tcp://x"\n[api]\nqueue_size = 0\n')
    proc = agent_cmd("run", "--config", str(cfg), "--device-id", "dev-1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert all(line.startswith("config error: ") for line in lines)
    assert any("heartbeat_interval_s" in line and "(got -1)" in line for line in lines)
    assert any("broker.url" in line and "'tcp://x'" in line for line in lines)
    assert any("api.queue_size" in line and "(got 0)" in line for line in lines)
    assert not state.exists()  # nothing was created
    assert "Traceback" not in proc.stderr


def test_bad_toml_and_missing_file_are_one_line(tmp_path):
    proc = agent_cmd("run", "--config", str(write(tmp_path, "[broker\nurl=")))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "not valid TOML" in proc.stderr
    proc = agent_cmd("run", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_environment_value_names_the_variable_path(tmp_path):
    proc = agent_cmd("run", "--config", str(write(tmp_path, "")), "--device-id", "d",
                     env={"EDGESHIP_AGENT_API__QUEUE_SIZE": "many"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "config error: api.queue_size: Input should be a valid integer, unable to parse string as an integer (got 'many')"


def test_misspelt_environment_variable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESHIP_AGENT_DEVICEID", "x")  # DEVICE_ID was meant
    monkeypatch.setenv("EDGESHIP_AGENT_BROKER__URLL", "mqtt://x")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, ""), {"device_id": "d"})
    assert info.value.lines == [
        "config error: environment EDGESHIP_AGENT_DEVICEID: unknown option (misspelt? every option is listed in "
        "configs/agent.toml) (got 'x')",
        "config error: broker.urll: unknown option (misspelt? every option is listed in configs/agent.toml) "
        "(got 'mqtt://x')",
    ]


def test_check_config_shows_resolved_values(tmp_path):
    cfg = write(tmp_path, '[broker]\nusername = "u"\npassword = "s3cret"\n')
    proc = agent_cmd("run", "--config", str(cfg), "--device-id", "d", "--label", "site=x", "--label", "line=2",
                     "--set", "broker.keepalive_s=45", "--check-config", env={"EDGESHIP_AGENT_HEARTBEAT_INTERVAL_S": "7"})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["labels"] == {"site": "x", "line": "2"}
    assert data["broker"]["keepalive_s"] == 45 and data["heartbeat_interval_s"] == 7
    assert "s3cret" not in proc.stdout



def test_download_settings_reach_the_update_manager(tmp_path, monkeypatch):
    """A bandwidth cap set in the environment is what the update manager's downloader uses."""
    from agent.facts import device_facts
    from agent.service import update_config

    monkeypatch.setenv("EDGESHIP_AGENT_DOWNLOAD__LIMIT_BPS", "200000")
    cfg = write(tmp_path, f'device_id = "dev-1"\nstate_dir = "{tmp_path / "state"}"\n[download]\nretries = 7\n')
    s = load_settings(cfg)
    assert (s.download.limit_bps, s.download.retries, s.download.timeout_s) == (200000, 7, 30.0)
    opts = update_config(s, session="s1", facts=device_facts()).download
    assert (opts.limit_bps, opts.retries, opts.timeout_s) == (200000, 7, 30.0)


def test_spin_wait_reaches_the_sessions_the_update_manager_opens(tmp_path, lm):
    """runtime.spin_wait (on by default) becomes onnxruntime's allow_spinning in the sessions models load with."""
    from agent.facts import device_facts
    from agent.runtime.session import session_options
    from agent.service import update_config

    facts = device_facts()
    on = load_settings(write(tmp_path, f'device_id = "dev-1"\nstate_dir = "{tmp_path / "s"}"\n'))
    off = load_settings(write(tmp_path, f'device_id = "dev-1"\nstate_dir = "{tmp_path / "s"}"\n[runtime]\nspin_wait = false\n'))
    assert (update_config(off, session="s", facts=facts).spin, update_config(on, session="s", facts=facts).spin) == (False, True)
    for spin, flag in ((False, "0"), (True, "1")):
        assert session_options(2, spin=spin).get_session_config_entry("session.intra_op.allow_spinning") == flag
    assert lm.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_huge_pages_setting_reaches_the_update_manager_and_the_loader(tmp_path, monkeypatch, keypair):
    """runtime.huge_pages (on by default) reaches the update manager's loads; off, no collapse is started."""
    from agent.facts import device_facts
    from agent.runtime import session as session_mod
    from agent.service import update_config

    facts = device_facts()
    on = load_settings(write(tmp_path, f'device_id = "dev-1"\nstate_dir = "{tmp_path / "s"}"\n'))
    off = load_settings(write(tmp_path, f'device_id = "dev-1"\nstate_dir = "{tmp_path / "s"}"\n[runtime]\nhuge_pages = false\n'))
    assert (update_config(off, session="s", facts=facts).huge_pages,
            update_config(on, session="s", facts=facts).huge_pages) == (False, True)
    started = []
    monkeypatch.setattr(session_mod, "_collapse", lambda regions, ref: started.append(len(regions)))
    from agent.bundle import TrustedKeys, open_bundle
    from agent.runtime import load_model
    from tests.support.bundles import make_bundle

    make_bundle(tmp_path / "b", keypair[0])
    vb = open_bundle(tmp_path / "b", TrustedKeys.from_paths([keypair[1]]))
    load_model(vb, huge_pages=False).close()
    assert started == []
    load_model(vb).close()
    assert len(started) == 1  # with the regions the session added (none for a model this small)


def test_bundle_names_come_from_toml_or_the_environment_and_bad_ones_are_named(tmp_path, monkeypatch):
    s = load_settings(write(tmp_path, 'bundle_names = ["smollm2-chat"]\n'), {"device_id": "d1"})
    assert s.bundle_names == ["smollm2-chat"]
    monkeypatch.setenv("EDGESHIP_AGENT_BUNDLE_NAMES", "smollm2-chat,minilm")
    assert load_settings(write(tmp_path, ""), {"device_id": "d1"}).bundle_names == ["smollm2-chat", "minilm"]
    monkeypatch.setenv("EDGESHIP_AGENT_BUNDLE_NAMES", "Bad Name")
    with pytest.raises(ConfigError, match="'Bad Name' is not a bundle name"):
        load_settings(write(tmp_path, ""), {"device_id": "d1"})
