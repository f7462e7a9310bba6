"""``yr.Config`` and ``yr.InvokeOptions``, with openYuanrong's field names.

Both check their fields when made: an unknown field, or a value of the wrong type, is 1001
(``YRValueError``). Ranges are checked by yr's core, with the same codes and messages as the
Rust SDK: ``Config`` at ``yr.init``, ``InvokeOptions`` at ``.options(...)``."""

import os
import json

from yr import _yr
from yr.exception import YRValueError

__all__ = ["Config", "InvokeOptions", "ClientInfo"]


class ClientInfo:
    """What ``yr.init`` returns."""

    def __init__(self, job_id):
        self.job_id = job_id

    def __repr__(self):
        return "ClientInfo(job_id={!r})".format(self.job_id)


def _typed(owner, name, value, types):
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise YRValueError("{}.{} must be {}, got {!r}".format(
            owner, name, " or ".join(t.__name__ for t in _tuple(types)), value))
    return value


def _tuple(types):
    return types if isinstance(types, tuple) else (types,)


class Config:
    """How ``yr.init`` runs: ``local_mode`` (everything in this process), or against a cluster
    (``server_address``; by default the cluster started on this machine, or a temporary one).

    Fields: ``local_mode``, ``server_address``, ``ds_address``, ``job_id``, ``ns``,
    ``log_level``, ``log_dir``, ``recycle_time`` (seconds, (0, 300]), ``custom_envs``
    (environment variables of every runtime of the job), ``working_dir`` (the runtimes' working
    directory and first import path; default the driver's), ``rpc_timeout``,
    ``max_task_instance_num``, ``num_cpus`` (local mode's threads), ``is_driver``,
    ``runtime_env`` (``{"env_vars": {...}, "working_dir": "..."}``: the runtimes' environment
    variables, under ``custom_envs``, and their working directory; other keys, such as
    ``pip`` or ``conda``, are refused with 1001), ``env_file`` (a ``.env`` file of
    ``NAME=value`` lines loaded into ``os.environ`` at ``yr.init``), ``auth_token`` (the
    cluster token, else the session's token file).
    """

    _FIELDS = {
        "local_mode": bool,
        "server_address": str,
        "ds_address": str,
        "job_id": str,
        "ns": str,
        "log_level": str,
        "log_dir": str,
        "recycle_time": (int, float),
        "custom_envs": dict,
        "working_dir": str,
        "rpc_timeout": (int, float),
        "max_task_instance_num": int,
        "num_cpus": int,
        "is_driver": bool,
        "runtime_env": dict,
        "env_file": str,
        "auth_token": str,
    }

    # The keys of ``runtime_env`` yr honours.
    _RUNTIME_ENV_KEYS = ("env_vars", "working_dir")

    def __init__(self, **fields):
        self.local_mode = False
        self.custom_envs = {}
        self.is_driver = True
        for name, value in fields.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        types = Config._FIELDS.get(name)
        if types is None:
            raise YRValueError("yr.Config has no field {!r}; its fields are {}".format(
                name, ", ".join(sorted(Config._FIELDS))))
        if value is not None:
            _typed("Config", name, value, types)
        if name == "custom_envs" and value is not None:
            for key, env in value.items():
                if not isinstance(key, str) or not isinstance(env, str):
                    raise YRValueError("Config.custom_envs maps names to values, both str; "
                                       "got {!r}: {!r}".format(key, env))
        if name == "runtime_env" and value is not None:
            Config._check_runtime_env(value)
        object.__setattr__(self, name, value)

    @staticmethod
    def _check_runtime_env(runtime_env):
        for key in runtime_env:
            if key not in Config._RUNTIME_ENV_KEYS:
                raise YRValueError("yr does not support runtime_env[{!r}] yet; it takes {}"
                                   .format(key, ", ".join(Config._RUNTIME_ENV_KEYS)))
        envs = runtime_env.get("env_vars", {})
        if not isinstance(envs, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in envs.items()):
            raise YRValueError("runtime_env['env_vars'] maps names to values, both str; got "
                               "{!r}".format(envs))
        working_dir = runtime_env.get("working_dir")
        if working_dir is not None and not isinstance(working_dir, str):
            raise YRValueError("runtime_env['working_dir'] must be a str, got {!r}".format(
                working_dir))

    def runtime_envs(self):
        """The environment variables of every runtime of the job: ``custom_envs``, then
        ``runtime_env["env_vars"]`` over them."""
        envs = dict(self.custom_envs or {})
        envs.update((getattr(self, "runtime_env", None) or {}).get("env_vars", {}))
        return envs

    def runtime_working_dir(self):
        """The runtimes' working directory: ``working_dir``, else
        ``runtime_env["working_dir"]``, else ``None`` (the driver's)."""
        return getattr(self, "working_dir", None) or (
            getattr(self, "runtime_env", None) or {}).get("working_dir")

    def _core_fields(self):
        """The fields yr's core takes, by its names."""
        names = {"num_cpus": "local_thread_pool_size", "auth_token": "token"}
        skipped = ("custom_envs", "is_driver", "runtime_env", "env_file")
        core = {}
        for name, value in vars(self).items():
            if value is None or name in skipped:
                continue
            core[names.get(name, name)] = value
        if self.runtime_working_dir() is not None:
            core["working_dir"] = self.runtime_working_dir()
        return core

    def _load_env_file(self):
        """Load ``env_file`` into ``os.environ`` (1001 if it cannot be read or has a line
        that is not ``NAME=value``)."""
        path = getattr(self, "env_file", None)
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as lines:
                text = lines.read()
        except OSError as error:
            raise YRValueError("Config.env_file {!r} cannot be read: {}".format(path, error))
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[len("export "):].lstrip()
            name, equals, value = line.partition("=")
            name = name.strip()
            if not equals or not name.isidentifier():
                raise YRValueError("Config.env_file {!r}, line {}: expected NAME=value, got "
                                   "{!r}".format(path, number, line))
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            os.environ[name] = value

    def __repr__(self):
        return "Config({})".format(", ".join(
            "{}={!r}".format(k, v) for k, v in sorted(vars(self).items())))


# openYuanrong's names for fields the core spells differently.
_OPTION_ALIASES = {"idle_timeout": "idle_timeout_s", "timeout": "timeout_s"}
_OPTION_FIELDS = None


def _option_fields():
    global _OPTION_FIELDS
    if _OPTION_FIELDS is None:
        _OPTION_FIELDS = frozenset(json.loads(_yr.default_options()))
    return _OPTION_FIELDS


class InvokeOptions:
    """Options of a call or an instance: resources (``cpu`` millicores, ``memory`` MB,
    ``custom_resources``), ``concurrency``, ``retry_times``, ``recover_retry_times``,
    ``name``/``namespace``, ``env_vars``, ``idle_timeout``, ``timeout``, and every other
    field of openYuanrong's ``InvokeOptions`` that yr's core has (``yr errors`` and
    docs/invoke-options.md say which ones yr honours). An unknown field is 1001."""

    def __init__(self, **fields):
        object.__setattr__(self, "_fields", {})
        for name, value in fields.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        core = _OPTION_ALIASES.get(name, name)
        if core not in _option_fields():
            raise YRValueError("yr.InvokeOptions has no field {!r}".format(name))
        self._fields[core] = value

    def __getattr__(self, name):
        fields = object.__getattribute__(self, "_fields")
        core = _OPTION_ALIASES.get(name, name)
        if core in fields:
            return fields[core]
        if core in _option_fields():
            return json.loads(_yr.default_options())[core]
        raise AttributeError(name)

    def merged(self, **more):
        """A copy with ``more`` fields set."""
        copy = InvokeOptions()
        copy._fields.update(self._fields)
        for name, value in more.items():
            setattr(copy, name, value)
        return copy

    def to_json(self):
        """The options as yr's core reads them."""
        try:
            return json.dumps(self._fields)
        except TypeError as error:
            raise YRValueError("InvokeOptions hold a value that is not plain data: {}".format(
                error)) from None

    def validate(self):
        """Raise what the core raises for these options (1001 naming the field)."""
        _yr.validate_options(self.to_json())
        return self

    def __repr__(self):
        return "InvokeOptions({})".format(", ".join(
            "{}={!r}".format(k, v) for k, v in sorted(self._fields.items())))
