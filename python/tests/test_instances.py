"""Stateful instances: creation, ordered method calls, named instances, termination."""

import asyncio
import json
import os
import tempfile

import pytest

import yr
from yr.exception import YRError


@yr.instance
class Object:
    def __init__(self, value=0):
        self.value = value

    def save(self, value):
        self.value = value

    def get(self):
        return self.value


@yr.instance
class Counter:
    def __init__(self, start=0, *, step=1):
        self.total = start
        self.step = step

    def incr(self):
        self.total += self.step
        return self.total

    @yr.method(return_nums=2)
    def both(self):
        return self.total, -self.total

    def fail(self):
        raise KeyError("missing")


@yr.instance
class Broken:
    def __init__(self):
        raise RuntimeError("constructor failed")

    def ping(self):
        return "pong"


@yr.instance
class WithHook:
    def __init__(self, path):
        self.path = path

    def ping(self):
        return "pong"

    def __yr_shutdown__(self, grace_period_second):
        with open(self.path, "w") as out:
            out.write("shut down within {}".format(grace_period_second))


@yr.invoke
def incr_through(handle):
    return yr.get(handle.incr.invoke(), timeout=60)


def test_quickstart_three_instances_save_nine(backend):
    objects = [Object.invoke() for _ in range(3)]
    for instance in objects:
        instance.save.invoke(9)
    assert yr.get([instance.get.invoke() for instance in objects]) == [9, 9, 9]
    for instance in objects:
        instance.terminate()


def test_calls_run_in_order_and_keep_state(backend):
    counter = Counter.invoke(10, step=2)
    refs = [counter.incr.invoke() for _ in range(5)]
    assert yr.get(refs, timeout=60) == [12, 14, 16, 18, 20]
    total, negated = counter.both.invoke()
    assert yr.get([total, negated]) == [20, -20]
    counter.terminate(is_sync=True)


def test_a_method_exception_keeps_its_type(backend):
    counter = Counter.invoke()
    with pytest.raises(KeyError) as caught:
        yr.get(counter.fail.invoke())
    assert caught.value.code == 2002
    assert yr.get(counter.incr.invoke()) == 1
    counter.terminate()


def test_a_constructor_failure_surfaces_on_the_first_call(backend):
    broken = Broken.invoke()
    with pytest.raises(YRError) as caught:
        yr.get(broken.ping.invoke(), timeout=60)
    assert "constructor failed" in str(caught.value)


def test_terminate_runs_the_shutdown_hook_and_later_calls_fail_1007(backend):
    path = os.path.join(tempfile.mkdtemp(), "hook")
    instance = WithHook.invoke(path)
    assert yr.get(instance.ping.invoke(), timeout=60) == "pong"
    instance.terminate(is_sync=True)
    with open(path) as written:
        assert written.read().startswith("shut down within")
    with pytest.raises(YRError) as caught:
        yr.get(instance.ping.invoke(), timeout=60)
    assert caught.value.code == 1007


def test_named_instances(backend):
    named = Counter.options(name="counter-a", namespace="tests").invoke(5)
    assert yr.get(named.incr.invoke(), timeout=60) == 6
    found = yr.get_instance("counter-a", "tests", timeout=30)
    assert yr.get(found.incr.invoke(), timeout=60) == 7
    again = Counter.get_instance("counter-a", "tests")
    assert yr.get(again.both.invoke()) == [7, -7]
    assert {"name": "counter-a", "namespace": "tests"} in yr.list_named_instances(
        all_namespaces=True)
    yr.kill_instance(named.instance_id)


def test_a_handle_passed_into_a_task(backend):
    counter = Counter.invoke(100)
    assert yr.get(incr_through.invoke(counter), timeout=60) == 101
    counter.terminate()


def test_instantiating_directly_fails():
    with pytest.raises(RuntimeError, match="cannot be instantiated directly"):
        Counter()


def test_get_if_exists_returns_the_named_instance(backend):
    first = Counter.options(name="counter-shared", namespace="tests").invoke(0)
    assert yr.get(first.incr.invoke(), timeout=60) == 1
    second = Counter.options(name="counter-shared", namespace="tests",
                             get_if_exists=True).invoke(1000)
    assert yr.get(second.incr.invoke(), timeout=60) == 2
    yr.kill_instance(first.instance_id)


def test_lifetime_other_than_detached_is_1001():
    with pytest.raises(ValueError) as caught:
        Counter.options(name="x", lifetime="forever")
    assert caught.value.code == 1001


@yr.instance
class Rendezvous:
    """Every call waits until `expected` calls are inside at once: it finishes only if the
    calls interleave."""

    def __init__(self):
        self.inside = 0
        self.everyone = None

    async def arrive(self, expected):
        if self.everyone is None:
            self.everyone = asyncio.Event()
        self.inside += 1
        if self.inside == expected:
            self.everyone.set()
        await asyncio.wait_for(self.everyone.wait(), 30)
        return self.inside

    def inside_now(self):
        return self.inside


def test_an_async_actor_interleaves_concurrency_calls(backend):
    actor = Rendezvous.options(concurrency=100).invoke()
    refs = [actor.arrive.invoke(100) for _ in range(100)]
    assert yr.get(refs, timeout=60) == [100] * 100
    assert yr.get(actor.inside_now.invoke(), timeout=60) == 100
    actor.terminate()


@yr.instance
class AsyncWorker:
    def __init__(self):
        self.ticks = 0
        self.ticking = None

    async def fail(self):
        await asyncio.sleep(0)
        raise KeyError("async missing")

    @yr.method(return_nums=2)
    async def pair(self, value):
        return value, -value

    async def plus_one(self, refs):
        return await refs[0] + 1

    async def start_ticking(self):
        async def tick():
            while True:
                self.ticks += 1
                await asyncio.sleep(0.01)

        self.ticking = asyncio.get_running_loop().create_task(tick())

    async def ticks_now(self):
        return self.ticks


def test_async_methods_fail_return_values_await_refs_and_keep_their_tasks(backend):
    worker = AsyncWorker.invoke()
    with pytest.raises(KeyError, match="async missing"):
        yr.get(worker.fail.invoke(), timeout=60)
    assert yr.get(worker.pair.invoke(3), timeout=60) == [3, -3]
    assert yr.get(worker.plus_one.invoke([yr.put(41)]), timeout=60) == 42
    yr.get(worker.start_ticking.invoke(), timeout=60)
    first = yr.get(worker.ticks_now.invoke(), timeout=60)
    # A task a call started runs on after the call returned: its ticks keep growing.
    for _ in range(3000):
        if yr.get(worker.ticks_now.invoke(), timeout=60) > first + 2:
            break
    else:
        raise AssertionError("the task started by a call stopped when the call returned")
    worker.terminate()


@yr.instance
class Sleeper:
    def nap(self, seconds):
        import time
        time.sleep(seconds)
        return seconds


def test_method_options_bound_a_call_and_refuse_the_instances_fields(backend):
    sleeper = Sleeper.invoke()
    late = sleeper.nap.options(timeout_s=1).invoke(5)
    with pytest.raises(YRError) as caught:
        yr.get(late, timeout=60)
    assert caught.value.code == 4005
    # The bound belongs to that call only; the proxy's other calls have none.
    assert yr.get(sleeper.nap.invoke(0), timeout=60) == 0
    with pytest.raises(YRError) as caught:
        sleeper.nap.options(yr.InvokeOptions(cpu=2000)).invoke(0)
    assert caught.value.code == 1001 and "cpu" in str(caught.value)
    sleeper.terminate()


def test_a_name_held_by_another_class_is_1004_and_status_names_the_class(backend, request):
    counter_class = "{}.Counter".format(Counter.__module__)
    held = Counter.options(name="held-by-a-counter", namespace="tests").invoke(0)
    assert yr.get(held.incr.invoke(), timeout=60) == 1
    with pytest.raises(YRError) as caught:
        Object.options(name="held-by-a-counter", namespace="tests").invoke()
    assert caught.value.code == 1004
    assert counter_class in str(caught.value)
    if backend == "cluster":
        cluster = request.getfixturevalue("cluster")
        with open(os.path.join(cluster.session, "session.json")) as info:
            master = json.load(info)["master_address"]
        status = json.loads(cluster.status("--json", "--master-address", master))
        classes = {i["id"]: i["class"] for i in status["instances"]}
        assert classes[held.instance_id] == counter_class
        assert "Instances by class" in cluster.status("--master-address", master)
    yr.kill_instance(held.instance_id)
