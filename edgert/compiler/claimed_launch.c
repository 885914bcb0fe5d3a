/* A parallel launch for TVM kernels whose tasks are claimed as threads arrive.
 *
 * Linked into a graph's model.so by the compiler (edgert/compiler/launch.py); at load the runtime
 * points the library's __TVMBackendParallelLaunch at edgert_parallel_launch and sets the thread
 * count and the workers' cores (edgert/runtime/threads.py, ClaimedLaunch).
 *
 * Why: TVM's pool (TVMBackendParallelLaunch) gives each thread one task of a parallel loop and
 * waits for every task, so a worker without a core stalls the whole kernel until it runs. Here a
 * launch is cut into more tasks than threads (the kernel's own static split over `num_task`), the
 * tasks are claimed from one counter by whoever comes, the caller first, and the caller waits only
 * for the tasks that were claimed: a worker that arrives after the caller took the rest finds
 * nothing left. No barriers inside a launch (TVMBackendParallelBarrier): edgert's kernels use none.
 *
 * Plain C that also compiles as C++ (TVM links a module with g++), GCC/Clang atomics only. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

#define EDGERT_MAX_WORKERS 64
#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

/* ticket: launch generation << 32 | the next unclaimed task of that launch */
static uint64_t ticket;
static uint32_t wake; /* futex word, bumped by every launch */
static int sleepers;
static FTVMParallelLambda job_fn;
static void* job_data;
static int job_tasks;
static int job_done;
static int job_error;
static int threads = 1; /* threads a launch uses, the caller included */
static int started;     /* workers running */
static pthread_t workers[EDGERT_MAX_WORKERS];
static int spin_count = 2000;
static int tasks_per_thread = 4;
static int launching; /* a launch is in flight (the pool serves one at a time) */
static __thread int in_task;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;

static void run_claimed(void) {
  for (;;) {
    uint64_t t = LOAD(&ticket);
    FTVMParallelLambda fn = LOAD(&job_fn);
    void* data = LOAD(&job_data);
    int tasks = LOAD(&job_tasks);
    uint32_t idx = (uint32_t)t;
    if ((int)idx >= tasks) return;
    if (!__atomic_compare_exchange_n(&ticket, &t, t + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
    /* The claim succeeded: that launch still runs, so the fields read above are its own (a
     * launch's fields change only after all its tasks were claimed and done). */
    TVMParallelGroupEnv env = {0, tasks};
    in_task = 1;
    if (fn((int)idx, &env, data) != 0) STORE(&job_error, 1);
    in_task = 0;
    __atomic_fetch_add(&job_done, 1, __ATOMIC_ACQ_REL);
  }
}

static void* worker(void* arg) {
  (void)arg;
  uint32_t seen = LOAD(&wake);
  for (;;) {
    int spins = 0;
    uint32_t now;
    while ((now = LOAD(&wake)) == seen) {
      if (++spins < spin_count) {
        sched_yield();
        continue;
      }
      __atomic_fetch_add(&sleepers, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&wake, __ATOMIC_SEQ_CST) == seen)
        syscall(SYS_futex, &wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      __atomic_fetch_sub(&sleepers, 1, __ATOMIC_SEQ_CST);
      spins = 0;
    }
    seen = now;
    run_claimed();
  }
  return NULL;
}

/* Use ``n`` threads per launch (the caller included), starting workers as needed; returns the
 * count in use (fewer where a thread could not start). */
int edgert_pool_threads(int n) {
  if (n < 1) n = 1;
  if (n > EDGERT_MAX_WORKERS + 1) n = EDGERT_MAX_WORKERS + 1;
  pthread_mutex_lock(&start_lock);
  while (started < n - 1) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8 << 20); /* kernels keep scratch tiles on the stack */
    int rc = pthread_create(&workers[started], &attr, worker, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0) break;
    pthread_detach(workers[started]);
    started++;
  }
  threads = n <= started + 1 ? n : started + 1;
  pthread_mutex_unlock(&start_lock);
  return threads;
}

/* Pin worker ``i`` to ``cpu`` (-1: any CPU this process may use); 0 on success. */
int edgert_pool_pin(int i, int cpu) {
  if (i < 0 || i >= started) return -1;
  cpu_set_t set;
  if (cpu < 0) {
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
  } else {
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
  }
  return pthread_setaffinity_np(workers[i], sizeof(set), &set);
}

/* Yields a waiting worker spins before it sleeps, and tasks per thread of a launch (-1: keep). */
void edgert_pool_config(int spins, int per_thread) {
  if (spins >= 0) spin_count = spins;
  if (per_thread >= 1) tasks_per_thread = per_thread;
}

/* TVMBackendParallelLaunch's contract: run flambda(task, env, cdata) for every task of
 * ``num_task`` (0: the pool chooses), return 0, or -1 where a task failed. */
int edgert_parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int n = threads;
  if (num_task <= 0) num_task = n <= 1 ? 1 : n * tasks_per_thread;
  /* One thread, nested in a task, or another thread's launch in flight (TVM keeps a pool per
   * calling thread; this one is the library's): the tasks in order, here. */
  if (n <= 1 || in_task || num_task == 1 || __atomic_exchange_n(&launching, 1, __ATOMIC_ACQUIRE)) {
    TVMParallelGroupEnv env = {NULL, num_task};
    for (int i = 0; i < num_task; ++i)
      if (flambda(i, &env, cdata) != 0) return -1;
    return 0;
  }
  __atomic_store_n(&job_fn, flambda, __ATOMIC_RELAXED);
  __atomic_store_n(&job_data, cdata, __ATOMIC_RELAXED);
  __atomic_store_n(&job_tasks, num_task, __ATOMIC_RELAXED);
  __atomic_store_n(&job_done, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&job_error, 0, __ATOMIC_RELAXED);
  uint64_t gen = (LOAD(&ticket) >> 32) + 1;
  STORE(&ticket, gen << 32); /* publishes the fields above */
  __atomic_fetch_add(&wake, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0)
    syscall(SYS_futex, &wake, FUTEX_WAKE_PRIVATE, EDGERT_MAX_WORKERS, NULL, NULL, 0);
  run_claimed();
  while (LOAD(&job_done) < num_task) cpu_relax(); /* only tasks a worker holds are left */
  int error = LOAD(&job_error);
  __atomic_store_n(&launching, 0, __ATOMIC_RELEASE);
  return error ? -1 : 0;
}

#ifdef __cplusplus
}
#endif
