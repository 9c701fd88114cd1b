#!/usr/bin/env bash
# Run the whole test suite: lint, unit tests, and integration tests against a real Mosquitto
# and influxd that the fixtures start on free ports. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
.venv/bin/ruff check .
.venv/bin/mypy gateway device_sim  # the type checker (pyproject [tool.mypy]); tests: not yet
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
