"""KV from Python: the same store and codes as the Rust SDK, local mode and a cluster."""

import pytest

import yr
from yr.exception import YRError, YRTimeoutError, YRValueError


@yr.invoke
def read_in_a_task(key):
    return yr.kv_read(key, timeout=30)


def test_write_read_delete(backend):
    yr.kv_write("py-kv-a", b"1")
    yr.kv_set("py-kv-b", "two", yr.SetParam(ttl_second=3600))
    assert yr.kv_read("py-kv-a") == b"1"
    assert yr.kv_get(["py-kv-a", "py-kv-b"]) == [b"1", b"two"]
    assert yr.kv_exist(["py-kv-a", "py-kv-missing"]) == [True, False]
    yr.kv_del(["py-kv-a", "py-kv-b"])
    assert yr.kv_exist("py-kv-a") is False


def test_a_task_reads_what_the_driver_wrote(backend):
    yr.kv_write("py-kv-shared", b"from the driver")
    assert yr.get(read_in_a_task.invoke("py-kv-shared"), timeout=60) == b"from the driver"
    yr.kv_del("py-kv-shared")


def test_nx_on_an_existing_key_is_4206(backend):
    yr.kv_write("py-kv-nx", b"first")
    with pytest.raises(YRError) as caught:
        yr.kv_write("py-kv-nx", b"second", existence=yr.ExistenceOpt.NX)
    assert caught.value.code == 4206
    assert yr.kv_read("py-kv-nx") == b"first"
    yr.kv_del("py-kv-nx")


def test_ranges(backend):
    yr.kv_write("py-kv-digits", b"0123456789")
    assert yr.kv_get_with_param(["py-kv-digits"], yr.GetParams([yr.GetParam(2, 3)])) == [b"234"]
    assert yr.kv_get_with_param("py-kv-digits", [yr.GetParam(8, 0)]) == b"89"
    with pytest.raises(YRValueError):
        yr.kv_get_with_param("py-kv-digits", [yr.GetParam(8, 5)])
    yr.kv_del("py-kv-digits")


def test_a_missing_key_times_out_with_4005_and_a_bad_key_is_1001(backend):
    with pytest.raises(YRTimeoutError) as caught:
        yr.kv_read("py-kv-never", timeout=0.05)
    assert caught.value.code == 4005 and "py-kv-never" in str(caught.value)
    with pytest.raises(YRValueError) as caught:
        yr.kv_write("", b"x")
    assert caught.value.code == 1001
