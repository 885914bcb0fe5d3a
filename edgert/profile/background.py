"""Busy background processes beside a benchmark: a phone always runs other work.

`busy_processes(n)` starts ``n`` child processes that spin in a loop and ends them when the
block ends, also on Ctrl-C or an error; on Linux they also die with this process (they ask
the kernel for SIGKILL when their parent goes). The report says how much CPU they took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgert.errors import EdgertError

STARTUP_SECONDS = 0.3
# The child: die with the parent (prctl PR_SET_PDEATHSIG = 1, SIGKILL) where Linux allows, then spin.
_SPIN = (
    "import ctypes, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, 9)\n"
    "except Exception:\n"
    "    pass\n"
    "x = 0\n"
    "while True:\n"
    "    x += 1\n"
)


@dataclass
class Background:
    """The busy processes of a run: their ids and, once ended, the CPU seconds they used."""

    processes: int
    pids: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """Plain dict for JSON output."""
        return {"processes": self.processes, "pids": self.pids, "cpu_seconds": round(self.cpu_seconds, 2)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 where /proc cannot tell)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


@contextmanager
def busy_processes(n: int) -> Iterator[Background]:
    """Run ``n`` spinning processes for the duration of the block (n = 0: none)."""
    if n < 0:
        raise EdgertError(f"--background {n}: the number of busy processes must be 0 or more")
    report = Background(n)
    children: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            children.append(subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL))
        report.pids = [c.pid for c in children]
        if children:
            time.sleep(STARTUP_SECONDS)  # until they spin (a Python start-up), so the run sees them from its start
        yield report
    finally:
        report.cpu_seconds = sum(_cpu_seconds(c.pid) for c in children)
        for c in children:
            c.send_signal(signal.SIGKILL)
        for c in children:
            c.wait()
