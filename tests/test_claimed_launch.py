"""The claimed-task parallel launch graphs link in (edgert/compiler/claimed_launch.c): every task of
a launch runs once whoever claims it, a worker that does not run does not hold a launch up, and a
compiled graph runs its kernels through it."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.compiler.launch import OPTIONS, SOURCE

# A task body for the launch: counts each task it runs, notes the task count it was given and
# whether the launching thread ran it (tasks run by a worker count in ``by_workers``).
HARNESS = r"""
#include <stdint.h>
#include <pthread.h>
#ifdef __cplusplus
extern "C" {
#endif
typedef struct { void* sync_handle; int32_t num_task; } Env;
typedef struct { int32_t counts[256]; int32_t num_task; int32_t fail_task; int32_t by_workers;
                 pthread_t caller; int32_t spin; } Record;
int record_task(int task, Env* env, void* data) {
  Record* r = (Record*)data;
  __atomic_fetch_add(&r->counts[task], 1, __ATOMIC_RELAXED);
  __atomic_store_n(&r->num_task, env->num_task, __ATOMIC_RELAXED);
  if (!pthread_equal(pthread_self(), r->caller)) __atomic_fetch_add(&r->by_workers, 1, __ATOMIC_RELAXED);
  for (volatile int32_t i = 0; i < r->spin; ++i) {}
  return task == r->fail_task ? -1 : 0;
}
void set_caller(void* data) { ((Record*)data)->caller = pthread_self(); }
#ifdef __cplusplus
}
#endif
"""


class Record(ctypes.Structure):
    _fields_ = [
        ("counts", ctypes.c_int32 * 256),
        ("num_task", ctypes.c_int32),
        ("fail_task", ctypes.c_int32),
        ("by_workers", ctypes.c_int32),
        ("caller", ctypes.c_ulong),
        ("spin", ctypes.c_int32),
    ]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """claimed_launch.c and the harness as one library, built as the graph build links it (g++)."""
    cc = shutil.which("g++") or shutil.which("c++")
    if cc is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("launch")
    (folder / "harness.c").write_text(HARNESS)
    out = folder / "liblaunch.so"
    command = [cc, "-shared", "-fPIC", *OPTIONS, "-o", str(out), str(SOURCE), str(folder / "harness.c")]
    subprocess.run(command, check=True)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.edgert_pool_threads.argtypes = [ctypes.c_int]
    lib.edgert_pool_pin.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.edgert_pool_config.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.edgert_parallel_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


@pytest.fixture(scope="module")
def launch(library: Path) -> ctypes.CDLL:
    """The library loaded once for the module's tests."""
    return _load(library)


def _run(lib: ctypes.CDLL, num_task: int, launches: int, fail_task: int = -1) -> tuple[Record, list[int]]:
    record = Record()
    record.fail_task = fail_task
    lib.set_caller(ctypes.byref(record))
    fn = ctypes.cast(lib.record_task, ctypes.c_void_p)
    codes = [lib.edgert_parallel_launch(fn, ctypes.byref(record), num_task) for _ in range(launches)]
    return record, codes


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_task_of_every_launch_runs_once(launch, threads):
    assert launch.edgert_pool_threads(threads) == threads
    launch.edgert_pool_config(2000, 4)
    for num_task, tasks in [(0, 1 if threads == 1 else 4 * threads), (1, 1), (7, 7), (64, 64)]:
        record, codes = _run(launch, num_task, 300)
        assert codes == [0] * 300
        assert record.num_task == tasks
        assert list(record.counts[:tasks]) == [300] * tasks and not any(record.counts[tasks:])
        if threads == 1:
            assert record.by_workers == 0  # one thread: the caller runs them all


def test_a_failed_task_fails_the_launch_and_the_next_launch_is_clean(launch):
    launch.edgert_pool_threads(2)
    record, codes = _run(launch, 8, 50, fail_task=3)
    assert codes == [-1] * 50 and list(record.counts[:8]) == [50] * 8
    record, codes = _run(launch, 8, 50)
    assert codes == [0] * 50


def test_launches_from_two_threads_at_once_each_run_every_task_once(launch):
    """The pool serves one launch at a time; a launch that finds it busy runs its tasks in its own thread."""
    import threading

    launch.edgert_pool_threads(2)
    results: list[list[int]] = []

    def one() -> None:
        # After each launch returns, every task of it has run (none still in flight, none lost).
        record = Record()
        record.fail_task, record.spin = -1, 3000  # tasks of a few microseconds: the launches overlap
        launch.set_caller(ctypes.byref(record))
        fn = ctypes.cast(launch.record_task, ctypes.c_void_p)
        short = []
        for i in range(1000):
            code = launch.edgert_parallel_launch(fn, ctypes.byref(record), 8)
            short += [i] if code != 0 or list(record.counts[:8]) != [i + 1] * 8 else []
        results.append(short)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[], []]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not hasattr(os, "SCHED_IDLE"), reason="needs 2 CPUs")
def test_a_worker_without_a_core_does_not_hold_up_the_launches(library, tmp_path):
    """The worker pinned to a core that a busy process holds, at the idle scheduling class: TVM's
    pool would wait for its share of every launch; here the caller takes what it has not claimed."""
    cpu = sorted(os.sched_getaffinity(0))[-1]
    shutil.copy(library, tmp_path / "own.so")
    launch = _load(tmp_path / "own.so")  # a copy of its own: its pool has no workers yet
    tasks_before = set(os.listdir("/proc/self/task"))
    allowed = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        assert launch.edgert_pool_threads(2) == 2
        workers = set(os.listdir("/proc/self/task")) - tasks_before
        assert len(workers) == 1
        for tid in workers:  # the pool's worker, just started
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        assert launch.edgert_pool_pin(0, cpu) == 0
        launch.edgert_pool_config(0, 4)  # a worker that is woken sleeps again at once
        os.sched_setaffinity(0, allowed - {cpu})
        t = time.perf_counter()
        record, codes = _run(launch, 0, 2000)
        seconds = time.perf_counter() - t
    finally:
        os.sched_setaffinity(0, allowed)
        busy.kill()
        busy.wait()
    assert codes == [0] * 2000 and list(record.counts[:8]) == [2000] * 8
    # Each launch would wait for the starved worker's turn (a scheduler slice, milliseconds) if it
    # held a share of the work; claimed, the caller runs what the worker has not taken.
    assert record.by_workers < 200, record.by_workers
    assert seconds < 2.0, seconds


def test_a_compiled_graph_runs_its_kernels_through_the_claimed_launch(tmp_path):
    """The graph build links the launch in, the session switches the library to it, and the outputs
    at 2 threads are onnxruntime's (a dense graph whose symbolic rows make its matmul parallel)."""
    ort = pytest.importorskip("onnxruntime")
    from conftest import load_tool

    import edgert

    path = load_tool("make_tiny_onnx").write(tmp_path)["dense"]
    art = edgert.compile(str(path), output=tmp_path / "dense.edgert").path
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((3, 301, 37)).astype(np.float32)
    want = sess.run(None, {"x": x})[0]
    for threads in (1, 2):
        model = edgert.load(art, threads=threads)
        (claimed,) = model.session.pool.launches
        assert claimed.threads == threads
        for _ in range(20):
            np.testing.assert_allclose(model(x=x)["y"], want, rtol=1e-5, atol=1e-5)
