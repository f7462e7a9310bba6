"""yr's Python microbenchmark: the cases of Ray's `ray microbenchmark`
(ray/_private/ray_perf.py), under the same names, doing the same work through yr's Python API,
timed the same way; plus the measures issue 11 asks of the Python SDK.

Each case prints `<case name> per second <mean> +- <standard deviation>`, as Ray's does: after
a pause (`--pause-seconds`, Ray: 10 s) it runs its step for a warm-up second, then
`--trials` trials (Ray: 4) of `--trial-seconds` (Ray: 2 s), running the step in batches of a
tenth of the warm-up count, and reports the mean and standard deviation of the trials' rates.

yr's own measures (against a cluster):
- `single client put 100 MB numpy gigabytes` next to `memcpy 100 MB numpy gigabytes` (`np.copyto`
  of the same array into a buffer already touched), in the same run;
- `instance creation from the warm pool`: `Cls.invoke()` to the result of the instance's first
  method call (p50/p99 ms), each instance terminated before the next, samples `--refill-ms`
  apart so that the node refills its warm pool;
- `idle Python runtime RSS`: `VmRSS` of the node's Python runtimes (its children whose command
  line holds `yr._runtime`) before any case runs, when every runtime is an idle one of the warm
  pool.

Runs against a temporary one-machine cluster that `yr.init()` starts for it (the `yr` binary is
`$YR_BIN`, else the repository's release build; `YR_SERVER_ADDRESS` names a running cluster
instead), or `--local` for local mode:

    .venv/bin/python bench/python/microbenchmark.py [--local] [--case TEXT]
"""

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import yr

REPO = Path(__file__).resolve().parents[2]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", action="store_true", help="local mode")
    parser.add_argument("--case", default="", help="only cases whose name contains TEXT")
    parser.add_argument("--pause-seconds", type=float, default=10.0,
                        help="pause before each case (Ray: 10)")
    parser.add_argument("--warmup-seconds", type=float, default=1.0, help="Ray: 1")
    parser.add_argument("--trial-seconds", type=float, default=2.0, help="Ray: 2")
    parser.add_argument("--trials", type=int, default=4, help="Ray: 4")
    parser.add_argument("--async-concurrency", type=int, default=1,
                        help="concurrency of the async-actor cases' instances (yr's default 1: "
                        "an async method call waits for the previous one; Ray's async actors "
                        "run up to 1000 at once)")
    parser.add_argument("--create-samples", type=int, default=20,
                        help="warm-pool instance creations to time")
    parser.add_argument("--refill-ms", type=float, default=500.0,
                        help="pause between creation samples, for the warm pool to refill")
    return parser.parse_args()


ARGS = None


def selected(name):
    return ARGS.case in name


def timeit(name, fn, multiplier=1):
    """Ray's `timeit` (ray._private.ray_microbenchmark_helpers), with its parameters as flags."""
    if not selected(name):
        return None
    time.sleep(ARGS.pause_seconds)
    start = time.perf_counter()
    count = 0
    while time.perf_counter() - start < ARGS.warmup_seconds:
        fn()
        count += 1
    step = count // 10 + 1
    stats = []
    for _ in range(ARGS.trials):
        start = time.perf_counter()
        count = 0
        while time.perf_counter() - start < ARGS.trial_seconds:
            for _ in range(step):
                fn()
            count += step
        end = time.perf_counter()
        stats.append(multiplier * count / (end - start))
    mean = float(np.mean(stats))
    sd = float(np.std(stats))
    print(name, "per second", round(mean, 2), "+-", round(sd, 2), flush=True)
    return mean


# ----- the code the cases run (Ray's, with yr's decorators) -----------------------------------

# Ray's actors ask for no CPU; yr's smallest request lets them sit beside the stateless pool.
SMALL = yr.InvokeOptions(cpu=300)


@yr.instance
class Actor:
    def small_value(self):
        return b"ok"

    def small_value_arg(self, x):
        return b"ok"

    def small_value_batch(self, n):
        yr.get([small_value.invoke() for _ in range(n)], timeout=-1)


@yr.instance
class AsyncActor:
    async def small_value(self):
        return b"ok"

    async def small_value_with_arg(self, x):
        return b"ok"

    async def small_value_batch(self, n):
        await asyncio.gather(*[small_value.invoke() for _ in range(n)])


@yr.instance
class Client:
    def __init__(self, servers):
        if not isinstance(servers, list):
            servers = [servers]
        self.servers = servers

    def small_value_batch(self, n):
        results = []
        for s in self.servers:
            results.extend([s.small_value.invoke() for _ in range(n)])
        yr.get(results, timeout=-1)

    def small_value_batch_arg(self, n):
        x = yr.put(0)
        results = []
        for s in self.servers:
            results.extend([s.small_value_arg.invoke(x) for _ in range(n)])
        yr.get(results, timeout=-1)


@yr.invoke
def small_value():
    return b"ok"


@yr.invoke
def create_object_containing_ref():
    return [yr.put(1) for _ in range(10000)]


@yr.invoke
def do_put_small():
    for _ in range(100):
        yr.put(0)


@yr.invoke
def do_put():
    for _ in range(10):
        yr.put(np.zeros(10 * 1024 * 1024, dtype=np.int64))


@yr.invoke
def work(actors, n):
    yr.get([actors[i % len(actors)].small_value.invoke() for i in range(n)], timeout=-1)


def ready(handles):
    """Wait until each instance answers (its creation is not part of a case)."""
    for handle in handles:
        yr.get(handle.small_value.invoke(), timeout=-1)
    return handles


def instance_case(name, cls, count, step, multiplier=1, options=SMALL, clients=None):
    """One of Ray's actor cases: `count` instances of `cls` (and the `Client` instances that
    `clients(instances)` makes), `step(instances, clients)` timed, then all terminated."""
    if not selected(name):
        return
    instances = ready([cls.options(options).invoke() for _ in range(count)])
    made = clients(instances) if clients else []
    timeit(name, lambda: step(instances, made), multiplier)
    terminate(instances, made)


def terminate(*groups):
    for group in groups:
        for handle in group:
            handle.terminate()


def get(refs):
    return yr.get(refs, timeout=-1)


# ----- Ray's cases ----------------------------------------------------------------------------

def ray_cases():
    value = yr.put(0)

    timeit("single client get calls (Plasma Store)", lambda: get(value))
    timeit("single client put calls (Plasma Store)", lambda: yr.put(0))
    timeit("multi client put calls (Plasma Store)",
           lambda: get([do_put_small.invoke() for _ in range(10)]), 1000)

    if selected("single client put gigabytes"):
        arr = np.zeros(100 * 1024 * 1024, dtype=np.int64)
        timeit("single client put gigabytes", lambda: yr.put(arr), 8 * 0.1)
        del arr

    def small_value_batch():
        get([small_value.invoke() for _ in range(1000)])
        return 0

    timeit("single client tasks and get batch", small_value_batch)
    timeit("multi client put gigabytes", lambda: get([do_put.invoke() for _ in range(10)]),
           10 * 8 * 0.1)

    if selected("single client get object containing 10k refs"):
        obj_containing_ref = create_object_containing_ref.invoke()
        timeit("single client get object containing 10k refs",
               lambda: get(obj_containing_ref))
        del obj_containing_ref

    def wait_multiple_refs():
        not_ready = [small_value.invoke() for _ in range(1000)]
        for _ in range(1000):
            # Ray's wait returns exactly num_returns refs; yr's returns every finished one:
            # keep one, as Ray does, so that each step makes 1000 waits.
            ready, rest = yr.wait(not_ready, wait_num=1)
            not_ready = ready[1:] + rest

    timeit("single client wait 1k refs", wait_multiple_refs)
    timeit("single client tasks sync", lambda: get(small_value.invoke()))
    timeit("single client tasks async",
           lambda: get([small_value.invoke() for _ in range(1000)]), 1000)

    n_cpu = max(1, multiprocessing.cpu_count() // 2)
    m = 4

    def one_call(instances, _):
        get(instances[0].small_value.invoke())

    def batch(instances, _):
        get([instances[0].small_value.invoke() for _ in range(1000)])

    def client_batch(n):
        return lambda _, clients: get(clients[0].small_value_batch.invoke(n))

    def work_batches(n):
        return lambda instances, _: get([work.invoke(instances, n) for _ in range(m)])

    def one_client(instances):
        return [Client.options(SMALL).invoke(instances)]

    def client_each(instances):
        return [Client.options(SMALL).invoke(a) for a in instances]

    instance_case("multi client tasks async", Actor, m,
                  lambda actors, _: get([a.small_value_batch.invoke(10000) for a in actors]),
                  10000 * m)
    instance_case("1:1 actor calls sync", Actor, 1, one_call)
    instance_case("1:1 actor calls async", Actor, 1, batch, 1000)
    instance_case("1:1 actor calls concurrent", Actor, 1, batch, 1000,
                  options=SMALL.merged(concurrency=16))
    instance_case("1:n actor calls async", Actor, n_cpu, client_batch(5000), 5000 * n_cpu,
                  clients=one_client)
    instance_case("n:n actor calls async", Actor, n_cpu, work_batches(5000), m * 5000)
    instance_case("n:n actor calls with arg async", Actor, n_cpu,
                  lambda _, clients: get([c.small_value_batch_arg.invoke(1000)
                                          for c in clients]),
                  1000 * n_cpu, clients=client_each)
    interleaved = SMALL.merged(concurrency=ARGS.async_concurrency)
    instance_case("1:1 async-actor calls sync", AsyncActor, 1, one_call, options=interleaved)
    instance_case("1:1 async-actor calls async", AsyncActor, 1, batch, 1000, options=interleaved)
    instance_case("1:1 async-actor calls with args async", AsyncActor, 1,
                  lambda actors, _: get([actors[0].small_value_with_arg.invoke(i)
                                         for i in range(1000)]),
                  1000, options=interleaved)
    instance_case("1:n async-actor calls async", AsyncActor, n_cpu, client_batch(5000),
                  5000 * n_cpu, options=interleaved, clients=one_client)
    instance_case("n:n async-actor calls async", AsyncActor, n_cpu, work_batches(5000), m * 5000,
                  options=interleaved)

    if selected("placement group create/removal"):
        print("placement group create/removal: not applicable (yr's Python SDK has no "
              "placement groups yet)", flush=True)


# ----- yr's own measures ----------------------------------------------------------------------

MB100 = 100 * 1000 * 1000


def put_against_memcpy():
    """A 100 MB numpy put next to a 100 MB numpy copy, in the same run."""
    if not (selected("single client put 100 MB numpy gigabytes")
            or selected("memcpy 100 MB numpy gigabytes")):
        return
    source = np.ones(MB100, dtype=np.uint8)
    target = np.zeros(MB100, dtype=np.uint8)
    target[:] = 2
    put = timeit("single client put 100 MB numpy gigabytes", lambda: yr.put(source), MB100 / 1e9)
    copy = timeit("memcpy 100 MB numpy gigabytes", lambda: np.copyto(target, source),
                  MB100 / 1e9)
    if put and copy:
        print("single client put 100 MB numpy / memcpy {:.2f}".format(put / copy), flush=True)


def quantile(sorted_values, p):
    rank = max(1, min(len(sorted_values), int(np.ceil(len(sorted_values) * p))))
    return sorted_values[rank - 1]


def warm_creation():
    name = "instance creation from the warm pool"
    if not selected(name) or ARGS.create_samples <= 0:
        return
    time.sleep(ARGS.pause_seconds)
    samples = []
    for _ in range(ARGS.create_samples):
        time.sleep(ARGS.refill_ms / 1000)
        start = time.perf_counter()
        actor = Actor.options(SMALL).invoke()
        get(actor.small_value.invoke())
        samples.append((time.perf_counter() - start) * 1000)
        actor.terminate(is_sync=True)
    samples.sort()
    print("{} (Cls.invoke to the first call's result) ms p50 {:.2f} p99 {:.2f} ({} samples)"
          .format(name, quantile(samples, 0.5), quantile(samples, 0.99), len(samples)),
          flush=True)


def processes():
    """pid -> (parent pid, command line) of every process this user can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/stat".format(entry)) as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open("/proc/{}/cmdline".format(entry), "rb") as cmdline:
                command = cmdline.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, command)
    return table


def rss_mb(pid):
    try:
        with open("/proc/{}/status".format(pid)) as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def python_runtimes():
    """The Python runtimes of the node this driver uses: children of a `yr` node process
    (one this process started, for the temporary cluster; else any on this machine) whose
    command line holds `yr._runtime`."""
    table = processes()

    def is_node(command):
        return Path(command[0].decode(errors="replace")).name == "yr" and (
            b"node" in command or b"start" in command)

    descendants = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier}
        descendants |= frontier
    nodes = {pid for pid in descendants if is_node(table[pid][1])}
    if not nodes:
        nodes = {pid for pid, (_, command) in table.items() if is_node(command)}
    return sorted(pid for pid, (parent, command) in table.items()
                  if parent in nodes and any(b"yr._runtime" in part for part in command))


def idle_runtime_rss():
    name = "idle Python runtime RSS"
    if not selected(name):
        return
    deadline = time.monotonic() + 30
    runtimes = python_runtimes()
    while not runtimes and time.monotonic() < deadline:
        time.sleep(0.2)
        runtimes = python_runtimes()
    time.sleep(2)  # let the warm pool settle
    sizes = sorted(s for s in (rss_mb(pid) for pid in python_runtimes()) if s is not None)
    if not sizes:
        print("{} MB unknown (no Python runtime found under the node)".format(name), flush=True)
        return
    print("{} MB p50 {:.1f} max {:.1f} ({} runtimes: {})".format(
        name, statistics.median(sizes), sizes[-1], len(sizes),
        " ".join("{:.1f}".format(s) for s in sizes)), flush=True)


def main():
    global ARGS
    ARGS = parse_args()
    if ARGS.local:
        yr.init(yr.Config(local_mode=True))
    else:
        if "YR_SERVER_ADDRESS" not in os.environ:
            # A cluster of its own: `yr.init()` would otherwise join the latest one `yr start`
            # left on this machine (another user's test cluster on a shared machine).
            os.environ["YR_SESSION_ROOT"] = tempfile.mkdtemp(prefix="yr-microbenchmark-")
        if "YR_BIN" not in os.environ:
            target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
            candidate = target / "release" / "yr"
            if candidate.is_file():
                os.environ["YR_BIN"] = str(candidate)
        yr.init()
    print("load average {:.2f} {:.2f} {:.2f} at start; YR_SPIN_MAX={}".format(
        *os.getloadavg(), os.environ.get("YR_SPIN_MAX", "(unset)")), flush=True)
    if not ARGS.local:
        idle_runtime_rss()
    ray_cases()
    put_against_memcpy()
    if not ARGS.local:
        warm_creation()
    print("load average {:.2f} {:.2f} {:.2f} at end".format(*os.getloadavg()), flush=True)
    yr.finalize()


if __name__ == "__main__":
    sys.exit(main())
