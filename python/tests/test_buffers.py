"""Large buffers travel out of band (pickle protocol 5) and are read in place: `yr.get` of a
numpy array or a large bytes value gives a read-only view of the stored object, not a copy."""

import pytest

import yr

np = pytest.importorskip("numpy")

MB = 1024 * 1024
GB = 1024 * MB


def kilobytes_field(path, field):
    with open(path) as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no {} in {}".format(field, path))


def resident_bytes():
    return kilobytes_field("/proc/self/status", "VmRSS")


@yr.invoke
def describe(array):
    return array.flags.writeable, int(array[-1]), array.nbytes


def put_then_get(nbytes):
    """Put an array of ``nbytes`` (the driver keeps no copy of it), then get it: the value, and
    how much resident memory the get added."""
    ref = yr.put(np.arange(nbytes // 8, dtype=np.int64))
    before = resident_bytes()
    value = yr.get(ref)
    return value, resident_bytes() - before


def test_a_large_numpy_array_is_read_without_a_copy(backend):
    value, grown = put_then_get(100 * MB)
    assert grown < 20 * MB, "yr.get copied the array: resident memory grew {} MB".format(
        grown // MB)
    assert value.flags.writeable is False
    assert value.shape == (100 * MB // 8,) and int(value[12345]) == 12345


def test_a_1_gb_numpy_array_is_read_without_a_copy(backend):
    if backend != "cluster":
        pytest.skip("in local mode objects live in the driver's memory; the node's shared memory "
                    "is what a cluster reads in place")
    available = kilobytes_field("/proc/meminfo", "MemAvailable")
    if available < 3 * GB:
        pytest.skip("needs 3 GB of available memory (the array, its copy in the node's shared "
                    "memory, headroom); this machine has {} MB available".format(available // MB))
    value, grown = put_then_get(GB)
    assert grown < 50 * MB, "yr.get copied the 1 GB array: resident memory grew {} MB".format(
        grown // MB)
    assert value.flags.writeable is False
    assert value.nbytes == GB and int(value[-1]) == GB // 8 - 1 and int(value[12345]) == 12345


def test_a_task_reads_a_large_array_argument_in_place(backend):
    array = np.ones(16 * MB // 8, dtype=np.int64)
    writeable, last, nbytes = yr.get(describe.invoke(array), timeout=60)
    assert (writeable, last, nbytes) == (False, 1, 16 * MB)


def test_large_bytes_come_back_as_a_read_only_memoryview(backend):
    data = bytes(range(256)) * 1024
    value = yr.get(yr.put(data))
    assert isinstance(value, memoryview) and value.readonly
    assert value == data
    small = yr.get(yr.put(b"small"))
    assert small == b"small" and isinstance(small, bytes)
