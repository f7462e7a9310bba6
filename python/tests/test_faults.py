"""A Python runtime killed mid-call: callers fail with 2002, or, with recover_retry_times,
the instance restarts and the call replays (at least once). Cluster only: local mode has no
runtime process to kill."""

import os
import signal
import tempfile
import time

import pytest

import yr
from yr.exception import YRError


@yr.instance
class Victim:
    def __init__(self, marker):
        self.marker = marker
        with open(marker, "a") as out:
            out.write("constructed\n")

    def pid(self):
        return os.getpid()

    def hold(self, seconds):
        with open(self.marker, "a") as out:
            out.write("hold\n")
        time.sleep(seconds)
        return os.getpid()


def lines(marker):
    with open(marker) as written:
        return written.read().split()


def wait_for_line(marker, line, count, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lines(marker).count(line) >= count:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def marker():
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "marker")
    open(path, "w").close()
    return path


def test_runtime_killed_mid_call_fails_callers_with_user_function_exception(backend, marker):
    if backend != "cluster":
        pytest.skip("local mode has no runtime process")
    victim = Victim.invoke(marker)
    pid = yr.get(victim.pid.invoke(), timeout=60)
    pending = victim.hold.invoke(30)
    assert wait_for_line(marker, "hold", 1), "the call started"
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(YRError) as caught:
        yr.get(pending, timeout=60)
    assert caught.value.code == 2002, caught.value


def test_runtime_killed_mid_call_replays_with_recover_retry(backend, marker):
    if backend != "cluster":
        pytest.skip("local mode has no runtime process")
    victim = Victim.options(recover_retry_times=1).invoke(marker)
    first = yr.get(victim.pid.invoke(), timeout=60)
    pending = victim.hold.invoke(1)
    assert wait_for_line(marker, "hold", 1), "the call started"
    os.kill(first, signal.SIGKILL)
    second = yr.get(pending, timeout=60)
    assert second != first
    assert lines(marker).count("constructed") == 2
    victim.terminate()
