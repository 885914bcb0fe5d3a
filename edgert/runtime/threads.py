"""TVM's CPU thread pool set up to survive a busy device: workers pinned one core each, the calling
thread kept off their cores during a call, bounded spinning, and a thread count that follows the cores
other processes leave free.

A phone always runs other work. TVM's defaults assume a quiet machine: each worker is pinned
to one core and spins (300,000 yields) at every barrier, and each parallel kernel splits its
work evenly over the workers, so one worker waiting for a core that another process holds
stalls every kernel of the step (measured on 2 cores with one busy process: 137.6 -> 1.7
tokens/s). Here, unless the user says otherwise:

- each worker is pinned to a core of its own, the calling thread is not (TVM's "big" mode, with
  the caller's affinity given back); a call that finds the calling thread on a worker's core moves
  it to a core no worker holds for the call's duration (`AdaptiveThreads.run`; left free, caller
  and worker took turns on one core); on a big.LITTLE CPU the workers share the big cores (TVM's
  "share all cores" mode over the fastest CPUs) instead of one each. Unpinned, a worker that had
  slept through ~50 ms without calls was woken onto the calling thread's core and stayed there for
  several calls: an encoder_320 call at 2 threads took 2.03 ms after a 50 ms pause against 1.33
  back to back, and 1.33 either way pinned (docs/graph-zoo.md). A pinned worker on a core another
  process keeps busy costs no more than an unpinned one (SmolLM2, 2 threads forced beside one busy
  process: 267 against 247-271 tokens/s), and by default the count drops to one thread there;
- a worker spins ``SPIN_COUNT`` yields before it sleeps (TVM reads the variable once, when
  its first worker starts, so it is set before the first pool exists);
- the count is the CPUs this process may use minus what other processes keep busy, sampled
  from ``/proc/stat`` at load and again about once a second while the model runs
  (`AdaptiveThreads.refresh`), never more than the pool was sized for; where the kernel reports
  CPU pressure (``/proc/pressure/cpu``), time in which some task waited for a CPU means one core
  fewer, so a count that is one too many cannot hold itself up.

``--threads N`` (or ``TVM_NUM_THREADS``) fixes the count; ``TVM_BIND_THREADS`` and
``TVM_THREAD_POOL_SPIN_COUNT`` set by the user are left as they are.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgert.errors import EdgertError
from edgert.runtime import tvm_runtime

# Yields a worker spins before it sleeps: a few hundred microseconds on a quiet core, which keeps
# workers awake between the kernels of one step, and gives a busy core back soon.
SPIN_COUNT = 2000
REFRESH_SECONDS = 1.0  # how often the free-core count is sampled again while running
SAMPLE_SECONDS = 0.05  # the first sample, at load
# Share of an interval in which some task waited for a CPU (PSI "some") that means the workers
# are one too many. Measured on 2 cores, Gemma 3 decode: 0.02 alone at 2 threads, 0.00 at 1 thread
# beside a busy process, 0.49 at 2 threads beside it (23.9 against 122 tokens/s at 1 thread).
STALL_SHARE = 0.2
# Tasks per thread of a claimed launch (`ClaimedLaunch`): a late worker leaves its share to the others
# in pieces of this size (convnet at 2 threads, loaded: 1, 2, 4 gave medians of 0.323, 0.321, 0.333 ms).
TASKS_PER_THREAD = 4
# TVM's affinity modes (threading_backend.h).
MODE_BIG = 1
MODE_SHARE_ALL = -3

T = TypeVar("T")


def _libc_getcpu() -> Callable[[], int] | None:
    """glibc's / bionic's ``sched_getcpu`` (the CPU the calling thread runs on), None where absent."""
    try:
        fn = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError, TypeError):  # TypeError: no process-wide handle (Windows)
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


_getcpu = _libc_getcpu()

_written: dict[str, str] = {}  # the variables edgert set itself (told apart from the user's)


def _user_env(name: str) -> str | None:
    """The variable's value when the user (not edgert) set it."""
    value = os.environ.get(name)
    return None if value is None or _written.get(name) == value else value


def _set_env(name: str, value: str) -> None:
    os.environ[name] = value
    _written[name] = value


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _binding_on() -> bool:
    """TVM pins its workers unless ``TVM_BIND_THREADS`` is set to something other than 1."""
    value = os.environ.get("TVM_BIND_THREADS")
    try:
        return value is None or int(value) == 1
    except ValueError:
        return False


def pinned_cpus(exclude: int | None = None, tasks: Path = Path("/proc/self/task")) -> set[int]:
    """The CPUs to which some thread of this process (other than ``exclude``) is pinned alone."""
    held: set[int] = set()
    try:
        tids = [int(t.name) for t in tasks.iterdir() if t.name.isdigit()]
    except OSError:
        return held
    for tid in tids:
        if tid == exclude:
            continue
        try:
            mask = os.sched_getaffinity(tid)
        except OSError:
            continue  # the thread ended meanwhile
        if len(mask) == 1:
            held |= mask
    return held


def big_cpus(cpus: list[int], root: Path = Path("/sys/devices/system/cpu")) -> list[int]:
    """The fastest of ``cpus`` by their maximum clock (all of them when the clocks are equal or unknown)."""
    freq: dict[int, int] = {}
    for cpu in cpus:
        try:
            freq[cpu] = int((root / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").read_text())
        except (OSError, ValueError):
            return list(cpus)
    top = max(freq.values(), default=0)
    return [c for c in cpus if freq[c] == top]


@dataclass
class CpuSample:
    """Busy and total clock ticks of some CPUs, this process's own CPU ticks, and how many other
    processes' threads wanted a CPU, at one moment."""

    busy: int
    total: int
    own: int
    others_running: int = 0
    stall_us: int | None = None  # PSI's cumulative "some" CPU stall, microseconds (None: not reported)


def _own_running(tasks: Path) -> int:
    """This process's threads that are running or runnable now (state R)."""
    running = 0
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return 0
    for task in entries:
        try:
            if (task / "stat").read_text().rpartition(")")[2].split()[0] == "R":
                running += 1
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
    return running


def _stall_us(pressure: Path) -> int | None:
    """The "some" line's total of /proc/pressure/cpu: microseconds in which a task waited for a CPU."""
    try:
        first = pressure.read_text().split("\n", 1)[0].split()
        return int(next(f for f in first if f.startswith("total="))[6:]) if first[0] == "some" else None
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def sample(
    cpus: list[int],
    stat: Path = Path("/proc/stat"),
    self_stat: Path = Path("/proc/self/stat"),
    tasks: Path = Path("/proc/self/task"),
    pressure: Path = Path("/proc/pressure/cpu"),
) -> CpuSample | None:
    """Read the counters (None where /proc is not there)."""
    # This process's runnable threads are counted before and after the system's count is read,
    # and the smaller count is taken: a worker that wakes between the reads would otherwise be
    # subtracted without having been counted, hiding a busy neighbour.
    own_before = _own_running(tasks)
    try:
        lines = stat.read_text().splitlines()
        own_fields = self_stat.read_text().rpartition(")")[2].split()
    except OSError:
        return None
    own_running = min(own_before, _own_running(tasks))
    stall = _stall_us(pressure)
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = running = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in wanted:
            ticks = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
        elif parts and parts[0] == "procs_running":
            running = int(parts[1])
    others = max(0, running - own_running) if running else 0
    # utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 after the command name.
    return CpuSample(busy, total, int(own_fields[11]) + int(own_fields[12]), others, stall)


def free_cpus(before: CpuSample, after: CpuSample, num_cpus: int) -> float:
    """CPUs left free by other processes between two samples (this process's use counts as free).

    Other processes count by the CPU time they took or by how many of their threads wanted a CPU
    at both samples, whichever is more. Time alone is bistable: while this process runs a worker
    per core, a busy neighbour gets only part of a core, looks half idle, and the count stays
    too high (measured: Gemma 3 decode at 2 threads beside one busy process, 0.19x its quiet
    speed). A thread that is runnable at both samples wants a core whatever it got. Both can
    miss a neighbour that this process's workers crowd out (the count of runnable threads is
    racy); CPU pressure cannot: waiting for a CPU in more than ``STALL_SHARE`` of the interval
    counts as one core taken.
    """
    total = after.total - before.total
    if total <= 0:
        return float(num_cpus)
    wall = total / num_cpus  # ticks per CPU in the interval
    used = (after.busy - before.busy - (after.own - before.own)) / wall
    wanting = min(before.others_running, after.others_running)
    free = num_cpus - max(used, float(wanting))
    if before.stall_us is not None and after.stall_us is not None:
        seconds = wall / os.sysconf("SC_CLK_TCK")
        if (after.stall_us - before.stall_us) / 1e6 > STALL_SHARE * seconds:
            free = min(free, num_cpus - 1.0)
    return max(0.0, free)


def threads_for(free: float, limit: int) -> int:
    """Workers for ``free`` CPUs: a CPU counts when more than about 60% of it is free."""
    return max(1, min(limit, int(free + 0.4)))


class ClaimedLaunch:
    """A library's own parallel launch (``edgert_parallel_launch``, compiled in by the compiler from
    ``claimed_launch.c``): tasks claimed as threads arrive, so a worker without a core costs the tasks
    it took, not the kernel. `attach` switches the library's kernels to it.

    TVM's pool hands each thread one task and waits for all: mobilenet at 2 threads beside one busy
    process took 12-24 ms a call against 0.14 (docs/graph-zoo.md).
    """

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.lib.edgert_pool_threads.argtypes = [ctypes.c_int]
        self.lib.edgert_pool_pin.argtypes = [ctypes.c_int, ctypes.c_int]
        self.lib.edgert_pool_config.argtypes = [ctypes.c_int, ctypes.c_int]
        self.lib.edgert_pool_config(SPIN_COUNT, TASKS_PER_THREAD)
        self.threads = 1
        self.cpus: list[int] = []

    @classmethod
    def attach(cls, library: str | Path) -> ClaimedLaunch | None:
        """Switch the loaded ``library``'s kernels to its claimed launch; None where it has none (built
        before it, or not found among the loaded libraries: TVM's pool stays)."""
        try:
            # The handle is never closed: the library stays mapped while its workers live.
            lib = ctypes.CDLL(str(library), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            slot = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
            launch = ctypes.cast(lib.edgert_parallel_launch, ctypes.c_void_p).value
        except (OSError, ValueError, AttributeError):
            return None
        claimed = cls(lib)
        slot.value = launch
        return claimed

    def configure(self, threads: int, cpus: list[int]) -> None:
        """Use ``threads`` threads a launch (the caller one of them), worker i pinned to ``cpus[i]``
        where given (else free)."""
        if threads != self.threads:
            self.threads = int(self.lib.edgert_pool_threads(threads))
        if cpus != self.cpus:
            for i in range(self.threads - 1):
                self.lib.edgert_pool_pin(i, cpus[i] if i < len(cpus) else -1)
            self.cpus = list(cpus)


class AdaptiveThreads:
    """The thread pool's configuration: fixed when forced, else following the free cores."""

    def __init__(self, threads: int | None = None, default: int | None = None):
        user = _user_env("TVM_NUM_THREADS")
        self.forced = bool(threads or user)
        self.cpus = allowed_cpus()
        try:
            wanted = int(threads or user or default or len(self.cpus))
        except ValueError:
            raise EdgertError(f"TVM_NUM_THREADS={user!r} is not a whole number") from None
        # More workers than CPUs only wait on each other (and 100000 never finish starting).
        self.limit = max(1, min(wanted, os.cpu_count() or 1))
        # TVM sizes its pool from TVM_NUM_THREADS, else from half the logical CPUs (it assumes
        # two hyper-threads per core), which leaves one of two real cores idle; and
        # config_threadpool cannot grow the pool past that. So the variable is set first.
        _set_env("TVM_NUM_THREADS", str(self.limit))
        if _user_env("TVM_THREAD_POOL_SPIN_COUNT") is None:
            _set_env("TVM_THREAD_POOL_SPIN_COUNT", str(SPIN_COUNT))
        big = self.big = big_cpus(self.cpus)  # read once: `_home_cpu` orders the free cores by it
        self.bind = _user_env("TVM_BIND_THREADS")
        if self.bind is None:
            # On a big.LITTLE CPU the workers share the big cores (not one each); elsewhere each
            # worker gets a core of its own (both need TVM's binding on; see the module's note).
            self.share = big if len(big) < len(self.cpus) and self.limit <= len(big) else []
            _set_env("TVM_BIND_THREADS", "1")
        else:
            self.share = []
        self.threads = self.limit
        self._last: CpuSample | None = None
        self._at = 0.0
        self._thread: int | None = None
        self._home: set[int] | None = None  # the calling thread's core during a call (None: left free)
        self._held: set[int] = set()  # the cores pinned workers hold
        self.launches: list[ClaimedLaunch] = []  # libraries whose kernels launch through their own pool
        if not self.forced:
            first = sample(self.cpus)
            if first is not None:
                time.sleep(SAMPLE_SECONDS)
                self._update(first)
        self.apply()

    def _update(self, before: CpuSample) -> None:
        after = sample(self.cpus)
        if after is not None:
            self.threads = threads_for(free_cpus(before, after, len(self.cpus)), self.limit)
            self._last, self._at = after, time.monotonic()

    def apply(self) -> None:
        """Configure the calling thread's pool (TVM keeps one per calling thread)."""
        configure = tvm_runtime.global_func("runtime.config_threadpool")
        # TVM may pin the calling thread to one core, which would starve everything else the
        # application runs on that thread (numpy, another engine's OpenMP pool), so its
        # affinity is given back.
        saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        if self.share:
            configure(MODE_SHARE_ALL, self.threads, [str(c) for c in self.share])
        else:
            configure(MODE_BIG, self.threads)
        if saved is not None:
            os.sched_setaffinity(0, saved)
        self._thread = threading.get_ident()
        for launch in self.launches:
            launch.configure(self.threads, self._worker_cpus())
        self._home = self._home_cpu()

    def attach(self, launch: ClaimedLaunch) -> None:
        """Run ``launch``'s workers as this pool's: the same count, on the cores TVM's workers hold."""
        self.launches.append(launch)
        launch.configure(self.threads, self._worker_cpus())
        self._home = self._home_cpu()

    def _worker_cpus(self) -> list[int]:
        """The cores for the workers of a claimed launch (binding on, one core each; else none: free):
        those TVM's workers are pinned to, or where they are not (yet) found, the last cores of the
        allowed ones (the caller's is the first free one, `_home_cpu`)."""
        workers = self.threads - 1
        if workers < 1 or self.share or not _binding_on():
            return []
        held = sorted(pinned_cpus(exclude=threading.get_native_id()))
        if len(held) >= workers:
            return held[:workers]
        order = self.big + [c for c in self.cpus if c not in self.big]
        return order[-workers:] if len(order) > workers else []

    def _home_cpu(self) -> set[int] | None:
        """A core for the calling thread while a call runs: one that no pinned worker holds.

        Only with more than one thread, the workers pinned one core each (binding on, not the shared
        big cores) and a core left over; else None (the caller stays free).
        """
        if self.threads < 2 or self.share or not _binding_on() or not hasattr(os, "sched_setaffinity"):
            return None
        held = self._held = pinned_cpus(exclude=threading.get_native_id())
        big = self.big
        free = [c for c in big + [c for c in self.cpus if c not in big] if c not in held]
        return {free[0]} if free and held else None

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` (a TVM function that may launch parallel kernels) after `refresh`; a calling
        thread found on a pinned worker's core is moved to a core of its own for the call (its
        affinity restored after).

        Left free, the caller often ran on the pinned worker's core, and the two took turns on one
        core (mobilenet at 2 threads: 0.087 ms there against 0.066 on the other core). Moving it
        costs two system calls (~4 us on a 2-core VM, as much as 5% of a 0.07 ms graph), so it is
        done only when the caller sits on a worker's core (``sched_getcpu``, ~0.3 us); restored, it
        stays on its new core until the scheduler moves it again.
        """
        self.refresh()
        home = self._home
        if home is None or (_getcpu is not None and _getcpu() not in self._held):
            return fn(*args)
        saved = os.sched_getaffinity(0)
        if not home <= saved:  # the application narrowed this thread to other cores: leave it
            return fn(*args)
        os.sched_setaffinity(0, home)
        try:
            return fn(*args)
        finally:
            os.sched_setaffinity(0, saved)

    def refresh(self) -> None:
        """Before a call: follow the free cores (about once a second) and configure a new calling thread."""
        if self._thread != threading.get_ident():
            self.apply()
        if self.forced or self._last is None or time.monotonic() - self._at < REFRESH_SECONDS:
            return
        old = self.threads
        self._update(self._last)
        if self.threads != old:
            self.apply()
