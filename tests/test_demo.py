"""The README's main command (`bash scripts/run-demo.sh` = `python -m device_sim demo`), as a
user reads its summary: the stuck valve is vented, and every boot's telemetry sent is what is
stored. Run twice in one working directory, as a user does: the demo's InfluxDB keeps the
first run's data, and the second summary must count its own run only (it counted both).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from device_sim.demo import DemoOptions, run_demo

ROW = re.compile(r"^(clinic-\d+/boot-\d+)\s+(yes|no)\s+(\S+)\s+(\d+)\s+[\d.]+\s+(\d+)\s+(\d+)")


async def test_the_demo_vents_the_stuck_valve_and_stores_what_was_sent(tmp_path: Path) -> None:
    for run in (1, 2):
        out = io.StringIO()
        code = await run_demo(DemoOptions(boots=4, seconds=6, workdir=tmp_path), out)
        text = out.getvalue()
        assert code == 0, text
        assert "result   PASS" in text, text
        rows = [m.groups() for line in text.splitlines() if (m := ROW.match(line))]
        assert len(rows) == 4, text
        for key, _online, outcome, vents, sent, stored in rows:
            assert int(sent) > 0 and sent == stored, f"run {run}: {key} sent {sent}, " \
                f"stored {stored}\n{text}"
            if key == "clinic-1/boot-003":
                assert outcome == "vented" and int(vents) == 1, text
        assert text.count("hard_ceiling") == 1, f"run {run}: {text}"


async def test_the_demo_leaves_the_process_logging_as_it_found_it(tmp_path: Path) -> None:
    """Its log file is closed at the end: a handler left on it made every later log call in
    the process print a 'Logging error' traceback (and the rest of the test run crawl)."""
    import logging

    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    assert await run_demo(DemoOptions(boots=2, seconds=3, stuck_boot=0, workdir=tmp_path),
                          io.StringIO()) == 0
    assert (root.handlers[:], root.level) == before
