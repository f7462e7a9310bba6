"""KV: the data system's key-value store (openYuanrong's ``kv_*`` API), shared by the drivers
and runtimes of a node (in local mode, by this process). Keys are 1 to 1024 bytes and values
bytes up to 64 MiB (1001 otherwise); ``ExistenceOpt.NX`` on an existing key is 4206; a write
over the node's per-job quota 4202; a read waits for keys not written yet and fails with 4005
(``YRTimeoutError``) naming them."""

import enum

from yr import _yr
from yr.exception import YRTypeError, YRValueError

__all__ = ["ExistenceOpt", "WriteMode", "CacheType", "SetParam", "GetParam", "GetParams",
           "kv_write", "kv_write_with_param", "kv_set", "kv_read", "kv_get",
           "kv_get_with_param", "kv_del", "kv_exist"]


class ExistenceOpt(enum.IntEnum):
    """Whether a write may replace an existing key."""
    NONE = 0
    NX = 1


class WriteMode(enum.IntEnum):
    """Where a written value lives."""
    NONE_L2_CACHE = 0
    WRITE_THROUGH_L2_CACHE = 1
    WRITE_BACK_L2_CACHE = 2
    NONE_L2_CACHE_EVICT = 3


class CacheType(enum.IntEnum):
    """openYuanrong's cache type (values are kept in memory either way)."""
    MEMORY = 0
    DISK = 1


class SetParam:
    """How a value is written: ``existence``, ``write_mode``, ``ttl_second`` (0: never
    expires) and ``cache_type``."""

    def __init__(self, existence=ExistenceOpt.NONE, write_mode=WriteMode.NONE_L2_CACHE,
                 ttl_second=0, cache_type=CacheType.MEMORY):
        self.existence = ExistenceOpt(existence)
        self.write_mode = WriteMode(write_mode)
        if isinstance(ttl_second, bool) or not isinstance(ttl_second, int) or ttl_second < 0:
            raise YRValueError("ttl_second must be an int >= 0, got {!r}".format(ttl_second))
        self.ttl_second = ttl_second
        self.cache_type = CacheType(cache_type)


class GetParam:
    """A range of a value: ``size`` bytes from ``offset`` (``size`` 0: to the end)."""

    def __init__(self, offset=0, size=0):
        self.offset = offset
        self.size = size


class GetParams:
    """One ``GetParam`` per key of a ranged read."""

    def __init__(self, get_params=None):
        self.get_params = list(get_params or [])


def _value(value):
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise YRTypeError("a KV value is bytes (or str), got {!r}".format(type(value).__name__))


def _keys(keys):
    single = isinstance(keys, str)
    listed = [keys] if single else list(keys)
    for key in listed:
        if not isinstance(key, str):
            raise YRTypeError("a KV key is a str, got {!r}".format(type(key).__name__))
    return single, listed


def _timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise YRTypeError("timeout must be a number of seconds, got {!r}".format(timeout))
    if timeout == -1:
        return None
    if timeout < 0:
        raise YRValueError("timeout must be -1 (wait forever) or >= 0, got {}".format(timeout))
    return float(timeout)


def kv_write(key, value, existence=ExistenceOpt.NONE, write_mode=WriteMode.NONE_L2_CACHE,
             ttl_second=0, cache_type=CacheType.MEMORY):
    """Write ``value`` under ``key``."""
    kv_write_with_param(key, value, SetParam(existence, write_mode, ttl_second, cache_type))


def kv_write_with_param(key, value, set_param):
    """Write ``value`` under ``key`` as ``set_param`` says."""
    if not isinstance(set_param, SetParam):
        raise YRTypeError("set_param must be a yr.SetParam")
    _yr.kv_write(key, _value(value), int(set_param.existence), int(set_param.write_mode),
                 set_param.ttl_second, int(set_param.cache_type))


def kv_set(key, value, set_param=None):
    """The same as ``kv_write_with_param``."""
    kv_write_with_param(key, value, set_param if set_param is not None else SetParam())


def kv_read(key, timeout=300):
    """The value of ``key`` (or the values of a list of keys), waiting up to ``timeout``
    seconds (-1: forever) for keys not written yet."""
    single, keys = _keys(key)
    values = _yr.kv_read(keys, _timeout(timeout))
    return values[0] if single else values


def kv_get(key, timeout=300):
    """The same as ``kv_read``."""
    return kv_read(key, timeout)


def kv_get_with_param(keys, get_params, timeout=300):
    """Ranges of values: one ``GetParam`` of ``get_params`` per key."""
    single, listed = _keys(keys)
    params = get_params.get_params if isinstance(get_params, GetParams) else get_params
    if len(params) != len(listed):
        raise YRValueError("kv_get_with_param got {} keys and {} GetParams; give one per key"
                           .format(len(listed), len(params)))
    seconds = _timeout(timeout)
    values = [_yr.kv_read_range(key, param.offset, param.size, seconds)
              for key, param in zip(listed, params)]
    return values[0] if single else values


def kv_del(key):
    """Delete a key or a list of keys (a missing key is no error)."""
    _, keys = _keys(key)
    _yr.kv_del(keys)


def kv_exist(key):
    """Whether a key exists (or, for a list of keys, each one)."""
    single, keys = _keys(key)
    found = _yr.kv_exist(keys)
    return found[0] if single else found
