#!/usr/bin/env bash
# The main job: a local Mosquitto and InfluxDB, the gateway, and a small simulated fleet in
# which one boot has a stuck valve; prints a fleet summary that shows the vent.
# Extra arguments go to `python -m device_sim demo` (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m device_sim demo "$@"
