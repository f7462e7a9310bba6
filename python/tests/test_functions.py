"""Stateless functions, objects and errors: the same story in local mode and on a cluster."""

import asyncio
import os
import queue
import threading
import time

import pytest

import yr
from yr.exception import (YRError, YRInvokeError, YRRuntimeError, YRTimeoutError, YRTypeError,
                          YRValueError)


@yr.invoke
def say_hello(name):
    return "hello, " + name


@yr.invoke
def add(a, b=0):
    return a + b


@yr.invoke(return_nums=2)
def divmod_remote(a, b):
    return divmod(a, b)


@yr.invoke(return_nums=0)
def returns_nothing():
    return None


@yr.invoke
def fail_with_value_error(x):
    raise ValueError("bad value {}".format(x))


_INITIALIZED = 0


def _initialize():
    global _INITIALIZED
    _INITIALIZED += 1


@yr.invoke(initializer=_initialize)
def times_initialized():
    return _INITIALIZED


class Unpicklable(Exception):
    def __init__(self):
        super().__init__("cannot cross")
        self.lock = __import__("threading").Lock()


@yr.invoke
def fail_unpicklably():
    raise Unpicklable()


@yr.invoke
def take_nested(refs):
    return sum(yr.get(refs["values"]))


@yr.invoke
def countdown(n):
    if n == 0:
        return 0
    return yr.get(countdown.invoke(n - 1), timeout=60) + 1


@yr.invoke
def sleep_then(seconds, value):
    time.sleep(seconds)
    return value


@yr.invoke
def where():
    return os.getpid()


def test_quickstart_prints_three_greetings(backend):
    refs = [say_hello.invoke("yuanrong") for _ in range(3)]
    assert yr.get(refs) == ["hello, yuanrong"] * 3


def test_arguments_keywords_and_refs(backend):
    assert yr.get(add.invoke(1, b=2)) == 3
    three = add.invoke(1, 2)
    assert yr.get(add.invoke(three, b=three)) == 6
    assert add.invoke(yr.put(40), 2).get() == 42


def test_nested_refs_reach_the_callee_as_refs(backend):
    refs = [yr.put(i) for i in range(4)]
    assert yr.get(take_nested.invoke({"values": refs})) == 6


def test_return_nums(backend):
    quotient, remainder = divmod_remote.invoke(17, 5)
    assert yr.get([quotient, remainder]) == [3, 2]
    assert returns_nothing.invoke() is None


def test_an_initializer_runs_once_in_each_runtime_before_the_first_call(backend):
    # Calls one after the other reuse one runtime (or the driver, in local mode); each saw the
    # initializer run exactly once in its process.
    counts = [yr.get(times_initialized.invoke()) for _ in range(5)]
    assert counts == [1] * 5
    with pytest.raises(YRTypeError):
        yr.invoke(initializer=42)


def test_calling_a_decorated_function_directly_fails():
    with pytest.raises(RuntimeError, match="cannot be called directly"):
        say_hello("x")


def test_nested_tasks(backend):
    assert yr.get(countdown.invoke(3), timeout=60) == 3


def test_user_exception_is_raised_again_with_its_type_and_traceback(backend):
    ref = fail_with_value_error.invoke(7)
    with pytest.raises(ValueError) as caught:
        yr.get(ref)
    error = caught.value
    assert isinstance(error, YRInvokeError)
    assert error.code == 2002
    assert "Traceback" in str(error) and "bad value 7" in str(error)
    assert "fail_with_value_error" in str(error)


def test_a_failed_dependency_raises_the_original_exception(backend):
    ref = add.invoke(fail_with_value_error.invoke(1), 1)
    with pytest.raises(ValueError) as caught:
        yr.get(ref)
    assert caught.value.code == 4306


def test_an_unpicklable_exception_becomes_a_yr_invoke_error(backend):
    with pytest.raises(YRInvokeError) as caught:
        yr.get(fail_unpicklably.invoke())
    assert "cannot cross" in str(caught.value)
    assert caught.value.cause is None


def test_redefining_a_function_runs_the_new_code(backend):
    def make(value):
        @yr.invoke
        def version():
            return value
        return version

    assert yr.get(make(1).invoke()) == 1
    assert yr.get(make(2).invoke()) == 2


def test_put_get_and_object_ref(backend):
    ref = yr.put({"a": [1, 2, 3]})
    assert isinstance(ref, yr.ObjectRef)
    assert ref.done()
    assert yr.get(ref) == {"a": [1, 2, 3]}
    assert ref.get(timeout=-1) == {"a": [1, 2, 3]}
    big = bytes(range(256)) * 4096  # 1 MiB: the node's shared memory on a cluster
    assert yr.get(yr.put(big)) == big


@pytest.mark.parametrize("value", [None, b"", bytearray()])
def test_put_of_nothing_is_1001(backend, value):
    with pytest.raises(ValueError) as caught:
        yr.put(value)
    assert isinstance(caught.value, YRValueError) and caught.value.code == 1001


def test_put_of_a_ref_is_a_type_error(backend):
    with pytest.raises(TypeError) as caught:
        yr.put(yr.put(1))
    assert isinstance(caught.value, YRTypeError)


def test_get_timeout_is_4005_and_minus_one_waits(backend):
    slow = sleep_then.invoke(3, "late")
    with pytest.raises(TimeoutError) as caught:
        yr.get(slow, timeout=0.1)
    assert isinstance(caught.value, YRTimeoutError) and caught.value.code == 4005
    assert yr.get(slow, timeout=-1) == "late"


@pytest.mark.parametrize("timeout", [0, -2])
def test_get_timeout_out_of_range_is_a_value_error(backend, timeout):
    with pytest.raises(YRValueError):
        yr.get(yr.put(1), timeout=timeout)


def test_wait(backend):
    fast = yr.put(1)
    slow = sleep_then.invoke(3, 2)
    ready, unready = yr.wait([fast, slow], wait_num=1, timeout=10)
    assert ready == [fast] and unready == [slow]
    ready, unready = yr.wait([fast, slow])
    assert len(ready) == 2 and unready == []
    with pytest.raises(YRValueError):
        yr.wait([fast, fast], wait_num=1)


def test_options(backend):
    assert yr.get(add.options(yr.InvokeOptions(retry_times=1)).invoke(1, 1)) == 2
    assert yr.get(add.options(concurrency=2).invoke(2, 2)) == 4
    with pytest.raises(YRValueError) as caught:
        add.options(cpu=1)
    assert caught.value.code == 1006
    with pytest.raises(YRValueError) as caught:
        yr.InvokeOptions(no_such_field=1)
    assert caught.value.code == 1001


def test_config_is_checked():
    with pytest.raises(YRValueError) as caught:
        yr.Config(no_such_field=1)
    assert caught.value.code == 1001
    with pytest.raises(YRValueError):
        yr.Config(local_mode="yes")


def test_init_twice_is_4001_and_an_invalid_config_1001(backend):
    assert yr.is_initialized()
    with pytest.raises(YRValueError) as caught:
        yr.init(yr.Config(local_mode=True, recycle_time=500))
    assert caught.value.code == 1001
    with pytest.raises(YRRuntimeError) as caught:
        yr.init(yr.Config(local_mode=True))
    assert caught.value.code == 4001


def test_errors_carry_code_module_and_message(backend):
    with pytest.raises(YRError) as caught:
        yr.get(sleep_then.invoke(3, 0), timeout=0.1)
    error = caught.value
    assert (error.code, error.module_code) == (4005, 20)
    assert str(error).startswith("failed to get object, code: 4005, module code: 20, msg: ")


def test_calls_run_in_runtime_processes_on_a_cluster(backend):
    pid = yr.get(where.invoke())
    assert (pid == os.getpid()) == (backend == "local")


def test_cancel_of_a_call_waiting_for_its_dependency(backend):
    slow = sleep_then.invoke(3, 1)
    waiting = add.invoke(slow, 1)
    yr.cancel(waiting)
    with pytest.raises(YRError) as caught:
        yr.get(waiting, timeout=30)
    assert caught.value.code == 1017
    assert "cancel" in str(caught.value)
    assert yr.get(slow, timeout=30) == 1


def _note(path, line):
    """Append ``line`` to the file at ``path`` if it still exists; whether it was written."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        return False
    with os.fdopen(fd, "a") as file:
        file.write(line + "\n")
    return True


@yr.invoke
def tick_until_gone(path):
    _note(path, "pid {}".format(os.getpid()))
    ticks = 0
    while ticks < 6000 and _note(path, "tick"):
        time.sleep(0.01)
        ticks += 1
    return ticks


@yr.invoke
def wait_for_child(own, child_path):
    child = tick_until_gone.invoke(child_path)
    try:
        yr.get(child, timeout=120)
        line = "child: ok"
    except YRError as error:
        line = "child: {}".format(error.code)
    _note(own, line)
    return 0


def _wait_until(check, timeout=30):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _lines(path):
    with open(path) as file:
        return file.read().splitlines()


@pytest.mark.parametrize("recursive", [True, False])
def test_cancel_with_allow_recursive_cancels_the_calls_the_task_submitted(backend, tmp_path,
                                                                          recursive):
    own, child = tmp_path / "parent", tmp_path / "child"
    own.write_text("")
    child.write_text("")
    parent = wait_for_child.invoke(str(own), str(child))
    _wait_until(lambda: len(_lines(child)) >= 2)
    yr.cancel(parent, allow_force=True, allow_recursive=recursive)
    with pytest.raises(YRError) as caught:
        yr.get(parent, timeout=30)
    assert caught.value.code == 1017
    if recursive:
        # The parent, left running, sees its child fail with the cancel's code; on a cluster
        # the child's runtime ends.
        _wait_until(lambda: "child: 1017" in _lines(own))
        pid = int(_lines(child)[0].split()[1])
        if backend == "cluster":
            _wait_until(lambda: not os.path.exists("/proc/{}".format(pid)))
        child.unlink()  # in local mode the abandoned child runs on until this
    else:
        ticked = len(_lines(child))
        _wait_until(lambda: len(_lines(child)) >= ticked + 5)
        assert not any(line.startswith("child:") for line in _lines(own))
        child.unlink()
        _wait_until(lambda: "child: ok" in _lines(own))


def test_object_ref_as_future_on_complete_and_await(backend):
    ref = add.invoke(20, 22)
    assert ref.as_future().result(timeout=30) == 42
    seen = queue.Queue()
    ref.on_complete(seen.put)
    assert seen.get(timeout=30) is ref

    async def main():
        return await add.invoke(1, 1)

    assert asyncio.run(main()) == 2
    with pytest.raises(ValueError):
        fail_with_value_error.invoke(5).as_future().result(timeout=30)


def test_a_get_in_one_thread_does_not_stall_another_threads_calls(backend):
    slow = sleep_then.invoke(5, "slow")
    results = queue.Queue()
    waiter = threading.Thread(target=lambda: results.put(yr.get(slow, timeout=60)))
    waiter.start()
    # The waiter is blocked in yr.get (GIL released): this thread's calls go on meanwhile.
    assert yr.get(add.invoke(2, 3), timeout=30) == 5
    assert not slow.done()
    waiter.join(timeout=60)
    assert results.get_nowait() == "slow"


def test_a_thousand_concurrent_tasks(backend):
    refs = [add.invoke(i, i) for i in range(1000)]
    assert yr.get(refs, timeout=120) == [2 * i for i in range(1000)]
