"""The module-level API: lifecycle, objects and named instances (openYuanrong's ``yr.*``)."""

import atexit
import numbers
import sys
import threading

from yr import _yr
from yr._yr import ObjectRef
from yr.config import ClientInfo, Config
from yr.exception import YRTypeError, YRValueError

__all__ = [
    "init", "finalize", "is_initialized", "put", "get", "wait", "cancel",
    "get_instance", "list_named_instances", "kill_instance",
]

_lock = threading.Lock()
_generation = 0
_config = None
_atexit_registered = False


def generation():
    """Which ``yr.init`` this is: code shipped under an earlier one is shipped again."""
    return _generation


def config():
    """The ``Config`` of the running ``yr.init`` (``None`` in a runtime)."""
    return _config


def init(conf=None):
    """Start yr in this process: ``Config(local_mode=True)`` runs everything here; otherwise
    yr connects to the cluster (``server_address``, the one started on this machine, or a
    temporary one it starts). Returns ``ClientInfo(job_id)``."""
    global _generation, _config, _atexit_registered
    if conf is None:
        conf = Config()
    if not isinstance(conf, Config):
        raise YRTypeError("yr.init takes a yr.Config, got {!r}".format(type(conf).__name__))
    with _lock:
        conf._load_env_file()
        conf._warn_no_effect()
        job_id = _yr.init(conf._core_fields(), sys.executable)
        if conf.local_mode:
            for path in reversed(conf.load_path_list()):
                if path not in sys.path:
                    sys.path.insert(0, path)
        _generation += 1
        _config = conf
        if not _atexit_registered:
            atexit.register(_finalize_at_exit)
            _atexit_registered = True
    return ClientInfo(job_id)


def _finalize_at_exit():
    if _yr.is_initialized():
        try:
            _yr.finalize()
        except Exception:  # noqa: BLE001 - nothing to report to at exit
            pass


def finalize():
    """Stop yr in this process: pending objects fail, instances of the job end. Does nothing
    if yr is not initialized."""
    global _config
    if not _yr.is_initialized():
        return
    _yr.finalize()
    _config = None


def is_initialized():
    """Whether ``yr.init`` ran and ``yr.finalize`` did not."""
    return _yr.is_initialized()


def put(obj, create_param=None):
    """Store ``obj`` as an object; returns its ``ObjectRef``. ``None`` or an empty buffer is
    1001; an ``ObjectRef`` is a ``TypeError`` (wrap it in a list)."""
    if isinstance(obj, ObjectRef):
        raise YRTypeError("yr.put does not take an ObjectRef; wrap it in a list to store it")
    if obj is None:
        raise YRValueError("yr.put got None; put a value")
    if isinstance(obj, (bytes, bytearray, memoryview)) and len(obj) == 0:
        raise YRValueError("yr.put got an empty buffer; put a non-empty value")
    return _yr.put(obj)


def _refs(refs, what):
    single = isinstance(refs, ObjectRef)
    listed = [refs] if single else refs
    if not isinstance(listed, (list, tuple)):
        raise YRTypeError("{} takes an ObjectRef or a list of them, got {!r}".format(
            what, type(refs).__name__))
    for ref in listed:
        if not isinstance(ref, ObjectRef):
            raise YRTypeError("{} takes ObjectRefs, got a {!r} in the list".format(
                what, type(ref).__name__))
    return single, list(listed)


def _seconds(timeout, what, forever_if_none=False):
    if timeout is None and forever_if_none:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise YRTypeError("{} timeout must be a number of seconds, got {!r}".format(what, timeout))
    if timeout == -1:
        return None
    if timeout < 0:
        raise YRValueError("{} timeout must be -1 (wait forever) or >= 0, got {}".format(
            what, timeout))
    return float(timeout)


def get(refs, timeout=300, allow_partial=False):
    """The value of an ``ObjectRef``, or the values of a list of them, waiting at most
    ``timeout`` seconds (-1: forever; 4005 ``YRTimeoutError`` after it). A remote exception
    is raised again, as a subclass of both ``YRInvokeError`` and its own type."""
    single, listed = _refs(refs, "yr.get")
    seconds = _seconds(timeout, "yr.get")
    if seconds == 0:
        raise YRValueError("yr.get timeout must be -1 (wait forever) or > 0, got 0")
    values = _yr.get(listed, seconds, bool(allow_partial))
    return values[0] if single else values


def wait(refs, wait_num=None, timeout=None):
    """Wait until ``wait_num`` (default: all) of ``refs`` are finished, or ``timeout`` seconds
    pass (``None`` or -1: forever). Returns ``(ready, unready)``; an object that failed is
    ready."""
    single, listed = _refs(refs, "yr.wait")
    if wait_num is None:
        wait_num = len(listed)
    if isinstance(wait_num, bool) or not isinstance(wait_num, int):
        raise YRTypeError("yr.wait wait_num must be an int, got {!r}".format(wait_num))
    if wait_num < 1:
        raise YRValueError("yr.wait wait_num must be in [1, {}], got {}".format(
            len(listed), wait_num))
    seconds = _seconds(timeout, "yr.wait", forever_if_none=True)
    ready, unready = _yr.wait(listed, wait_num, seconds)
    return [listed[i] for i in ready], [listed[i] for i in unready]


def cancel(refs, allow_force=False, allow_recursive=False):
    """Cancel the stateless calls producing ``refs``; a later ``get`` fails (1017). With
    ``allow_force``, a running call's results fail at once. With ``allow_recursive``, the
    stateless calls each one submitted while it ran are cancelled too, and theirs; on a cluster
    a running one that runs alone in its runtime is stopped (the runtime ends)."""
    _, listed = _refs(refs, "yr.cancel")
    _yr.cancel(listed, bool(allow_force), bool(allow_recursive))


def get_instance(name, namespace="", timeout=60):
    """A handle to the named instance, waiting up to ``timeout`` seconds for it to appear."""
    from yr.decorator import InstanceProxy

    instance_id = _yr.get_named_instance(name, namespace or "", float(timeout))
    return InstanceProxy(instance_id, {})


def list_named_instances(all_namespaces=False):
    """The named instances: names (the current namespace), or ``{name, namespace}`` dicts."""
    named = _yr.list_named_instances()
    if all_namespaces:
        return [{"name": name, "namespace": ns} for name, ns, _ in named]
    current = (_config.ns if _config is not None else None) or ""
    return [name for name, ns, _ in named if ns == current]


def kill_instance(instance_id):
    """Kill an instance by id and wait for it to exit."""
    _yr.terminate_instance(instance_id, True)
