"""The scenario command as ops meet it: a bad file is refused with its line, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def boot_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "device_sim", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_bad_scenario_is_refused_with_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "scenarios" / "fault-drill.yaml").read_text()
    bad.write_text(text.replace("telemetry_hz: 1.0", "telemetry_hz: fast", 1))
    line = next(i for i, ln in enumerate(bad.read_text().splitlines(), 1)
                if "telemetry_hz: fast" in ln)
    result = boot_sim("scenario", str(bad), "--check")
    assert result.returncode == 2
    assert f"bad.yaml:{line}: fleet.telemetry_hz" in result.stderr


def test_shipped_scenario_checks_and_prints_its_plan() -> None:
    result = boot_sim("scenario", "scenarios/fault-drill.yaml", "--check")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout and "stuck_valve" in result.stdout
