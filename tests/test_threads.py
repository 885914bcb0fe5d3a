"""The thread pool on a busy device: counting free cores, pinned workers, the calling thread's core, bounded
spinning, `--background`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from edgert.runtime import threads as th

STAT = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 {a} 0 0 {ia} 0 0 0 0 0 0
cpu1 {b} 0 0 {ib} 0 0 0 0 0 0
cpu2 {c} 0 0 {ic} 0 0 0 0 0 0
intr 1 2 3
"""


def _write(tmp: Path, busy: tuple[int, int, int], idle: tuple[int, int, int], own: int) -> th.CpuSample | None:
    (tmp / "stat").write_text(STAT.format(a=busy[0], b=busy[1], c=busy[2], ia=idle[0], ib=idle[1], ic=idle[2]))
    # The command name may hold spaces and parentheses: fields are counted after the last ')'.
    fields = ["S"] + ["0"] * 10 + [str(own), "0"] + ["0"] * 30
    (tmp / "self").write_text("1234 (python (x) y) " + " ".join(fields))
    return th.sample([0, 1], tmp / "stat", tmp / "self", pressure=tmp / "no-pressure")


def test_free_cores_leave_out_other_processes_and_count_this_one_as_free(tmp_path: Path) -> None:
    before = _write(tmp_path, (0, 0, 0), (0, 0, 0), own=0)
    # 100 ticks per CPU: cpu0 fully busy (60 of them ours), cpu1 busy 90 (others), cpu2 not ours.
    after = _write(tmp_path, (100, 90, 100), (0, 10, 0), own=60)
    assert before is not None and after is not None
    assert after.total == 200 and after.busy == 190 and after.own == 60
    free = th.free_cpus(before, after, 2)
    assert free == pytest.approx(2 - 1.3)
    assert th.threads_for(free, 8) == 1  # never fewer than one
    assert th.threads_for(2 - 0.1, 8) == 2 and th.threads_for(2 - 0.5, 8) == 1 and th.threads_for(3.0, 2) == 2
    assert th.free_cpus(after, after, 2) == 2.0  # no time passed: nothing known to be busy
    assert th.sample([0], tmp_path / "missing", tmp_path / "self") is None


def test_a_neighbour_that_wants_a_core_counts_as_busy_even_when_it_got_less(tmp_path: Path) -> None:
    # This process runs one thread (R) and sleeps another; the system has 3 runnable: 2 are others'.
    for tid, state in ((1, "R"), (2, "S")):
        (tmp_path / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "task" / str(tid) / "stat").write_text(f"{tid} (py (w) x) {state} 1 2 3")
    stat = STAT.format(a=0, b=0, c=0, ia=0, ib=0, ic=0) + "procs_running 3\n"
    (tmp_path / "stat").write_text(stat)
    (tmp_path / "self").write_text("1234 (python) " + " ".join(["S"] + ["0"] * 40))
    before = th.sample([0, 1], tmp_path / "stat", tmp_path / "self", tmp_path / "task", tmp_path / "no-pressure")
    assert before is not None and before.others_running == 2
    # Over the interval the others took only 0.5 CPU (this process held the cores), but two of their
    # threads were runnable at both samples: no CPU is free.
    after = th.CpuSample(busy=before.busy + 100, total=before.total + 200, own=before.own + 50, others_running=1)
    assert th.free_cpus(before, after, 2) == pytest.approx(1.0)  # min over the samples: one wanted a core throughout
    assert th.threads_for(th.free_cpus(before, after, 2), 2) == 1
    quiet = th.CpuSample(busy=after.busy + 10, total=after.total + 200, own=after.own + 10, others_running=0)
    assert th.free_cpus(after, quiet, 2) == pytest.approx(2.0)  # a neighbour seen once is a flicker


def test_cpu_pressure_takes_a_core_that_the_time_and_the_run_queue_missed(tmp_path: Path) -> None:
    pressure = tmp_path / "pressure"
    pressure.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\nfull avg10=0.00 total=0\n")
    assert th._stall_us(pressure) == 1_000_000
    assert th._stall_us(tmp_path / "missing") is None
    hz = os.sysconf("SC_CLK_TCK")
    # One second on 2 CPUs, the others' time and run queue say nothing: 2 free, unless tasks waited.
    quiet = th.CpuSample(busy=0, total=2 * hz, own=0, stall_us=1_020_000)
    crowded = th.CpuSample(busy=0, total=2 * hz, own=0, stall_us=1_490_000)
    start = th.CpuSample(busy=0, total=0, own=0, stall_us=1_000_000)
    assert th.free_cpus(start, quiet, 2) == pytest.approx(2.0)
    assert th.free_cpus(start, crowded, 2) == pytest.approx(1.0)  # waited 0.49 s of 1 s: one core taken
    assert th.threads_for(th.free_cpus(start, crowded, 2), 2) == 1
    unknown = th.CpuSample(busy=0, total=2 * hz, own=0)  # no /proc/pressure: the other signals alone
    assert th.free_cpus(start, unknown, 2) == pytest.approx(2.0)


def test_a_real_busy_process_is_seen_as_wanting_a_core() -> None:
    from edgert.profile.background import busy_processes

    cpus = th.allowed_cpus()
    with busy_processes(1):
        time.sleep(0.3)
        seen = [s.others_running for s in (th.sample(cpus) for _ in range(5)) if s is not None]
    assert seen and max(seen) >= 1


def test_big_cores_are_the_fastest_by_maximum_clock(tmp_path: Path) -> None:
    for cpu, khz in enumerate([1800000, 1800000, 2400000, 2400000]):
        (tmp_path / f"cpu{cpu}" / "cpufreq").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").write_text(f"{khz}\n")
    assert th.big_cpus([0, 1, 2, 3], tmp_path) == [2, 3]
    assert th.big_cpus([0, 1], tmp_path) == [0, 1]  # one kind of core: all of them
    assert th.big_cpus([0, 7], tmp_path) == [0, 7]  # a clock unknown: all of them


def _pool_env(tiny_host_artifact: Path, env: dict[str, str], threads: str = "None") -> dict:
    """Load the tiny model in a fresh process (a fresh TVM pool) and report what it set."""
    code = (
        "import json, os, edgert\n"
        f"m = edgert.load({str(tiny_host_artifact)!r}, threads={threads})\n"
        "m.score([1, 2, 3])\n"
        "keys = ('TVM_NUM_THREADS', 'TVM_BIND_THREADS', 'TVM_THREAD_POOL_SPIN_COUNT')\n"
        "print(json.dumps({'threads': m.session.threads, 'forced': m.session.pool.forced,\n"
        "                  **{k: os.environ.get(k) for k in keys}}))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("TVM_") or k == "TVM_USE_RUNTIME_LIB"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_default_pool_pins_workers_with_bounded_spinning_and_the_users_settings_win(tiny_host_artifact) -> None:
    cpus = len(os.sched_getaffinity(0))
    got = _pool_env(tiny_host_artifact, {})
    assert got["TVM_THREAD_POOL_SPIN_COUNT"] == str(th.SPIN_COUNT) and not got["forced"]
    assert got["TVM_BIND_THREADS"] == "1"  # workers one core each (or sharing the big cores)
    assert 1 <= got["threads"] <= int(got["TVM_NUM_THREADS"]) == cpus
    mine = _pool_env(tiny_host_artifact, {"TVM_BIND_THREADS": "0", "TVM_THREAD_POOL_SPIN_COUNT": "7"}, threads="1")
    assert (mine["TVM_BIND_THREADS"], mine["TVM_THREAD_POOL_SPIN_COUNT"]) == ("0", "7")
    assert mine["threads"] == 1 and mine["forced"]
    assert _pool_env(tiny_host_artifact, {"TVM_NUM_THREADS": "1"})["forced"]


def test_bench_background_runs_busy_processes_and_ends_them(tiny_host_artifact) -> None:
    proc = run_cli(
        "bench", str(tiny_host_artifact), "--prompt-tokens", "8", "--gen-tokens", "4", "-r", "1",
        "--background", "1", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    bg = result["background"]
    assert bg["processes"] == 1 and bg["cpu_seconds"] > 0.05  # it did spin
    time.sleep(0.2)
    for pid in bg["pids"]:
        assert not Path(f"/proc/{pid}").exists()
    proc = run_cli("bench", str(tiny_host_artifact), "--background", "-1")
    assert proc.returncode != 0 and "--background" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_pinned_cpus_are_the_cores_other_threads_are_pinned_to_alone(tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def pinned() -> None:
        os.sched_setaffinity(0, {cpus[-1]})
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(10)

    worker = threading.Thread(target=pinned)
    worker.start()
    try:
        assert ready.wait(10)
        # A task folder with this thread (all CPUs) and the pinned one, as /proc/self/task lists them.
        for t in (threading.get_native_id(), tid[0]):
            (tmp_path / str(t)).mkdir()
        assert th.pinned_cpus(tasks=tmp_path) == {cpus[-1]}
        assert th.pinned_cpus(exclude=tid[0], tasks=tmp_path) == set()
        assert cpus[-1] in th.pinned_cpus()  # the real list
    finally:
        done.set()
        worker.join()
    assert th.pinned_cpus(tasks=tmp_path / "missing") == set()


_CALLER = """
import json, os
from edgert.runtime import threads as th
cpus = sorted(os.sched_getaffinity(0))
pool = th.AdaptiveThreads(2)
out = {"home": sorted(pool._home or []), "held": sorted(pool._held)}
probe = lambda: (sorted(os.sched_getaffinity(0)), th._getcpu())
if pool._home:
    worker = min(pool._held)
    os.sched_setaffinity(0, {worker}); os.sched_setaffinity(0, cpus)  # on the worker's core, free to move
    out["on_worker"] = pool.run(probe)
    out["after"] = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {worker})  # the application's own narrowing is left as it is
    out["narrowed"] = pool.run(probe)
    os.sched_setaffinity(0, cpus)
out["one"] = th.AdaptiveThreads(1)._home
print(json.dumps(out))
"""


def _caller(env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TVM_") or k == "TVM_USE_RUNTIME_LIB"}
    proc = subprocess.run(
        [sys.executable, "-c", _CALLER], capture_output=True, text=True, env={**base, **env}, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or th._getcpu is None, reason="needs 2 CPUs and sched_getcpu")
def test_a_call_moves_the_calling_thread_off_the_pinned_workers_core_and_gives_its_affinity_back() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    got = _caller({})
    assert got["held"] and len(got["home"]) == 1 and got["home"][0] not in got["held"]
    affinity, cpu = got["on_worker"]
    assert affinity == got["home"] and cpu == got["home"][0]  # during the call: its own core only
    assert got["after"] == cpus  # given back
    assert got["narrowed"][0] == [min(got["held"])]  # not moved against the application's own mask
    assert got["one"] is None  # one thread: no worker to keep apart from
    # Workers not pinned (the user's TVM_BIND_THREADS=0): the caller is left free.
    assert _caller({"TVM_BIND_THREADS": "0"})["home"] == []
