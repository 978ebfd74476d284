"""The whole fleet on the production broker example: TLS only, the ACL of configs/mosquitto/, agents
configured by nothing but the agent.toml that `edgeship fleet device enroll` wrote (client
certificate or password), the controller logging in as fleet@controller with its client certificate."""

from __future__ import annotations

import pytest

from edgeship.localstack import LocalFleet
from tests.e2e.conftest import check_fleet, explain, rollout, wait_rollout
from tests.support.secure_broker import start_secure_broker

pytestmark = pytest.mark.e2e


def test_rollout_over_tls_with_enrolled_devices(tmp_path, processes, versions, keypair):
    secure = start_secure_broker(tmp_path / "broker", keypair[1], cert_devices=("dev-a", "dev-b"),
                                 password_devices=("dev-c",))
    try:
        fleet = LocalFleet(
            tmp_path / "fleet", processes, broker_url=f"mqtts://127.0.0.1:{secure.cert_port}",
            trusted_keys=[keypair[1]], controller_mqtt_url=f"mqtts://127.0.0.1:{secure.cert_port}",
            controller_env={"EDGESHIP_FLEET_MQTT_CERT_FILE": str(secure.workdir / "controller.crt"),
                            "EDGESHIP_FLEET_MQTT_KEY_FILE": str(secure.workdir / "controller.key"),
                            "EDGESHIP_FLEET_MQTT_CA_FILE": str(secure.ca_file)})
        fleet.start_controller()
        for device_id, directory in secure.devices.items():
            url = f"mqtts://127.0.0.1:{secure.password_port if device_id in secure.passwords else secure.cert_port}"
            fleet.start_agent(device_id, broker_url=url, env={"EDGESHIP_AGENT_CONFIG": str(directory / "agent.toml")})
        fleet.wait_online(list(secure.devices))
        client = fleet.client()
        client.push(versions.v1)
        r = wait_rollout(client, rollout(client, "tiny@1.0.0", waves="1,100%")["id"])
        assert r["state"] == "completed", explain(r)
        check_fleet(fleet, keypair, expect=versions.sha["1.0.0"])
        client.close()
    finally:
        processes.close()
        secure.stop()
