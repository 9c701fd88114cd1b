#!/usr/bin/env bash
# Prepare a fresh Debian machine: Mosquitto, InfluxDB and etcd packages when missing, and .venv.
# (etcd is for the tests and benches of several gateways sharing a fleet; one gateway, as in
# the demo, needs none.)
# Sourced by run-demo.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

missing=()
for pair in mosquitto:mosquitto mosquitto_sub:mosquitto-clients influxd:influxdb etcd:etcd-server; do
  bin=${pair%%:*} pkg=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/usr/bin/$bin" ] \
    || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" python3-venv >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "setup: creating $ROOT/.venv" >&2
  "$PY" -m venv "$ROOT/.venv"
fi
stamp="$ROOT/.venv/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  echo "setup: installing Python dependencies" >&2
  "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[sim,test]"
  rm -f "$ROOT"/.venv/.installed-* && touch "$stamp"
fi
