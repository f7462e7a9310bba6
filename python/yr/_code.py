"""A function's or class's code as it travels: pickled once per driver (cloudpickle), stored as
an object of the driver, and named in every call by the content hash of the pickled bytes and
a reference to that object. A runtime loads each hash once and keeps the reference, so the code
crosses the wire once per runtime (the first call fetches it from the driver, like any
argument); later calls carry the hash and the reference only. Redefining a function makes new
code with a new hash, so a notebook's new definition runs (docs/design/016-python-sdk.md)."""

import hashlib
import os
import sys
import threading

from yr import _yr, serialization


class Code:
    """The code of one decorated function or class, put once per ``yr.init``."""

    def __init__(self, obj):
        self.obj = obj
        self._lock = threading.Lock()
        self._shipped = None  # (generation, hash, ObjectRef)
        self._last = None  # (what the descriptor depends on, the prepared descriptor)

    def _ship(self):
        from yr import apis

        generation = apis.generation()
        with self._lock:
            if self._shipped is None or self._shipped[0] != generation:
                pickled = serialization.dumps(self.obj)
                digest = hashlib.sha256(pickled).hexdigest()
                self._shipped = (generation, digest, _yr.put(pickled))
            return self._shipped

    def descriptor(self, kwargs, return_nums=1):
        """What a call of this code carries as its first argument (``kwargs``: a tuple of
        keyword names), pickled once (``_yr.prepare``) for the calls that share it."""
        from yr import apis

        key = (apis.generation(), kwargs, return_nums, tuple(sys.path), os.getcwd())
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        _, digest, reference = self._ship()
        descriptor = _yr.prepare({
            "hash": digest,
            "code": reference,
            "name": "{}.{}".format(getattr(self.obj, "__module__", "?"),
                                   getattr(self.obj, "__qualname__", "?")),
            "sys_path": _driver_path(),
            "kwargs": list(kwargs),
            "return_nums": return_nums,
        })
        self._last = (key, descriptor)
        return descriptor


def _driver_path():
    """``Config.load_paths`` and the driver's ``sys.path`` (its working directory in place of
    ``''``), and the working directory, for the runtime to import what the code imports.
    ``Config.working_dir`` (or ``runtime_env["working_dir"]``) replaces the working
    directory."""
    from yr import apis

    config = apis.config()
    cwd = (config.runtime_working_dir() if config is not None else None) or os.getcwd()
    loaded = config.load_path_list() if config is not None else []
    return (loaded + [entry or cwd for entry in sys.path], cwd)
