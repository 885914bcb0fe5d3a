"""The claimed-task parallel launch (``claimed_launch.c``) linked into a CPU library.

TVM's pool splits each parallel loop into one task per thread and waits for all of them, so a
worker whose core another process holds stalls every parallel kernel until it runs (mobilenet at
2 threads beside one busy process: 0.14 -> 12-24 ms a call, docs/graph-zoo.md). The C file gives
the library a launch whose tasks are claimed as threads arrive; the runtime switches the library
to it at load (`edgert.runtime.threads.ClaimedLaunch`), and a library without it keeps TVM's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("claimed_launch.c")
# The link compiles the C file too (g++ as C++ on the host, the target's compiler when crossing):
# optimized, and with the threads library named for C libraries that keep it apart.
OPTIONS = ["-O2", "-pthread"]


def export_with_claimed_launch(executable: Any, path: Path | str, fcompile: Any) -> None:
    """``executable.export_library(path)`` with the claimed launch linked in (``fcompile`` as given)."""
    executable.export_library(str(path), fcompile=fcompile, addons=[str(SOURCE)], options=OPTIONS)
