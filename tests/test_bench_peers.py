"""bench/peers.py's --safety-priority: every thread of a process is moved, not only its first
(setpriority on a pid moves one thread on Linux)."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.peers import renice

# A child with a second thread that exists before the renice.
CHILD = """
import threading, time
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
print("up", flush=True)
time.sleep(30)
"""


def test_renice_moves_every_thread_of_the_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "up\n"
        tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        assert len(tids) == 2
        before = os.getpriority(os.PRIO_PROCESS, child.pid)
        renice(child.pid, before + 3)  # raising a nice value needs no privilege
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == [before + 3] * 2
    finally:
        child.kill()
        child.wait(5)
