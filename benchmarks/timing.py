"""Timing with the machine's other load measured: thread pinning, interleaved rounds, foreign CPU.

Nothing here imports a framework at module level: `pin_threads` must run before jax, numpy,
torch or faiss are imported, so their thread pools see the pinned count.
"""

import importlib
import importlib.metadata
import os
import platform
import resource
import statistics
import sys
import time

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "tensorflow-cpu",
    "torch",
    "scikit-learn",
    "faiss-cpu",
    "scikit-image",
)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pin_threads(threads):
  """Pins this process (and its children) to `threads` CPUs of its affinity set and sets the
  thread pools every framework reads at import: OpenMP/MKL/OpenBLAS (numpy, scikit-learn,
  faiss, torch) from the environment; XLA's CPU pool should follow the affinity set (it sizes
  itself to the schedulable CPUs; XLA_FLAGS has no thread-count flag), and
  `--xla_cpu_multi_thread_eigen=false` makes it serial at 1.
  Returns what was set. Call before importing jax/numpy/torch/faiss."""
  loaded = [m for m in ("jax", "numpy", "torch", "faiss") if m in sys.modules]
  if loaded:
    raise RuntimeError(f"pin_threads must run before importing {', '.join(loaded)}")
  available = sorted(os.sched_getaffinity(0))
  if not 1 <= threads <= len(available):
    raise SystemExit(
        f"--threads={threads}: this process may use {len(available)} CPUs "
        f"({available}); give 1..{len(available)}"
    )
  cpus = available[:threads]
  os.sched_setaffinity(0, cpus)
  for name in THREAD_ENV:
    os.environ[name] = str(threads)
  eigen = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + eigen).strip()
  return {
      "threads": threads,
      "cpus": cpus,
      **{name: os.environ[name] for name in THREAD_ENV},
      "XLA_FLAGS": os.environ["XLA_FLAGS"],
      "xla": "CPU thread pool sized by the affinity set (os.sched_setaffinity)",
  }


def pin_peer_threads(threads):
  """The runtime thread settings of the peers that are installed (torch, faiss, BLAS pools)."""
  done = {}
  try:
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(threads)
    done["torch.set_num_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  try:
    import faiss  # pylint: disable=import-outside-toplevel

    faiss.omp_set_num_threads(threads)
    done["faiss.omp_set_num_threads"] = threads
  except ImportError:
    pass
  try:
    import threadpoolctl  # pylint: disable=import-outside-toplevel

    threadpoolctl.threadpool_limits(threads)
    done["threadpoolctl"] = [
        {"api": p["internal_api"], "threads": p["num_threads"]}
        for p in threadpoolctl.threadpool_info()
    ]
  except ImportError:
    pass
  return done


def require(module, what):
  """Imports a peer lazily; a missing one is a clear error naming the extra to install."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingPeer(
        f"{what} needs `{module}` ({e}); install the bench extra: pip install -e '.[bench]'"
    ) from None


class MissingPeer(Exception):
  """A peer framework is not installed: its rows are reported as skipped."""


def versions():
  found = {}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def machine():
  """CPU model, cores, affinity, memory and OS of this machine."""
  model = ""
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
  return {
      "cpu_model": model,
      "cores": os.cpu_count(),
      "affinity": sorted(os.sched_getaffinity(0)),
      "memory_bytes": mem_kb * 1024,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "loadavg_at_start": os.getloadavg(),
  }


class CpuMeter:
  """Other processes' CPU use (in cores) on this process's CPUs over a window.

  Busy time of the CPUs in the affinity set from /proc/stat (user+nice+system+irq+softirq+
  steal), minus this process's own CPU time and its waited-for children's (getrusage), divided
  by the wall time. /proc/stat counts in clock ticks (10 ms), so windows well above a second
  give estimates good to a few hundredths of a core.
  """

  def __init__(self):
    self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    self.tick = os.sysconf("SC_CLK_TCK")

  def _busy_s(self):
    busy = 0
    with open("/proc/stat") as f:
      for line in f:
        fields = line.split()
        if fields[0] in self.cpus:
          user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
          busy += user + nice + system + irq + softirq + steal
    return busy / self.tick

  @staticmethod
  def _own_s():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

  def start(self):
    self._start = (time.perf_counter(), self._busy_s(), self._own_s())

  def foreign_cores(self):
    wall0, busy0, own0 = self._start
    wall = time.perf_counter() - wall0
    return max(0.0, (self._busy_s() - busy0) - (self._own_s() - own0)) / max(wall, 1e-9)


def block(out):
  """Waits for a result: jax arrays are asynchronous, torch/numpy results already done."""
  if "jax" in sys.modules:
    sys.modules["jax"].block_until_ready(out)
  return out


def summary(times_s):
  if not times_s:
    return {"min_s": None, "median_s": None, "max_s": None, "n": 0}
  return {
      "min_s": min(times_s),
      "median_s": statistics.median(times_s),
      "max_s": max(times_s),
      "n": len(times_s),
  }


def time_interleaved(fns, repeats, warmup=1, max_foreign_cores=None, max_extra_rounds=None):
  """Times peers side by side: {name: fn} called in turn (A, B, A, B, ...) so load hits all.

  The first call of each fn is timed on its own (trace + compile + one run); `warmup - 1` more
  untimed calls follow. Each round times every fn once and measures the foreign CPU load over
  the round; with `max_foreign_cores` set a round above it is discarded and another is run, at
  most `max_extra_rounds` (default `repeats`) times, after which the row is marked contaminated
  (its statistics then use every round). Returns {'fns': {name: stats}, 'rounds': [...],
  'contaminated': bool}.
  """
  first_call_s = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    block(fn())
    first_call_s[name] = time.perf_counter() - start
    for _ in range(warmup - 1):
      block(fn())
  meter = CpuMeter()
  extra = repeats if max_extra_rounds is None else max_extra_rounds
  rounds = []
  while sum(r["clean"] for r in rounds) < repeats and len(rounds) < repeats + extra:
    meter.start()
    seconds = {}
    for name, fn in fns.items():
      start = time.perf_counter()
      block(fn())
      seconds[name] = time.perf_counter() - start
    foreign = meter.foreign_cores()
    rounds.append(
        {
            "seconds": seconds,
            "foreign_cores": foreign,
            "clean": max_foreign_cores is None or foreign <= max_foreign_cores,
        }
    )
  contaminated = sum(r["clean"] for r in rounds) < repeats
  used = rounds if contaminated else [r for r in rounds if r["clean"]]
  stats = {}
  for name in fns:
    s = summary([r["seconds"][name] for r in used])
    s["first_call_s"] = first_call_s[name]
    s["compile_s"] = first_call_s[name] - s["median_s"]
    stats[name] = s
  return {
      "fns": stats,
      "rounds": rounds,
      "contaminated": contaminated,
      "max_foreign_cores_threshold": max_foreign_cores,
  }
