"""``yr.Config`` and ``yr.InvokeOptions``, with openYuanrong's field names.

Both check their fields when made: an unknown field, or a value of the wrong type, is 1001
(``YRValueError``). Ranges are checked by yr's core, with the same codes and messages as the
Rust SDK: ``Config`` at ``yr.init``, ``InvokeOptions`` at ``.options(...)``."""

import os
import json
import warnings

from yr import _yr
from yr.exception import YRValueError

__all__ = ["Config", "InvokeOptions", "ClientInfo", "UserTLSConfig", "DeploymentConfig"]


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


class UserTLSConfig:
    """Mutual TLS of a driver joining a cluster started with ``--tls-*`` (``Config.tls_config``):
    the CA (``root_cert_path``), the driver's certificate and key (``module_cert_path``,
    ``module_key_path``), and the name the servers' certificates carry (``server_name``; by
    default the host connected to).

    >>> tls = UserTLSConfig("ca.pem", "driver.pem", "driver.key", server_name="localhost")
    """

    def __init__(self, root_cert_path, module_cert_path, module_key_path, server_name=None):
        for name, value in (("root_cert_path", root_cert_path),
                            ("module_cert_path", module_cert_path),
                            ("module_key_path", module_key_path)):
            if not isinstance(value, str) or not value:
                raise YRValueError("UserTLSConfig.{} must be a non-empty path, got {!r}".format(
                    name, value))
        if server_name is not None and (not isinstance(server_name, str) or not server_name):
            raise YRValueError("UserTLSConfig.server_name must be a non-empty str or None, got "
                               "{!r}".format(server_name))
        self.root_cert_path = root_cert_path
        self.module_cert_path = module_cert_path
        self.module_key_path = module_key_path
        self.server_name = server_name

    def __repr__(self):
        return "UserTLSConfig({!r}, {!r}, {!r}, server_name={!r})".format(
            self.root_cert_path, self.module_cert_path, self.module_key_path, self.server_name)


class DeploymentConfig:
    """The resources of the cluster ``Config(auto=True)`` starts for the driver: ``cpu``
    (millicores), ``mem`` (MB), ``datamem`` (shared memory for objects, MB), ``spill_path`` and
    ``spill_limit`` (MB). 0 or ``""`` takes ``yr start``'s default.

    >>> conf = Config(auto=True, deployment_config=DeploymentConfig(cpu=4000, mem=8192))
    """

    def __init__(self, cpu=0, mem=0, datamem=0, spill_path="", spill_limit=0):
        for name, value in (("cpu", cpu), ("mem", mem), ("datamem", datamem),
                            ("spill_limit", spill_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise YRValueError("DeploymentConfig.{} must be an int >= 0, got {!r}".format(
                    name, value))
        if not isinstance(spill_path, str):
            raise YRValueError("DeploymentConfig.spill_path must be a str, got {!r}".format(
                spill_path))
        self.cpu = cpu
        self.mem = mem
        self.datamem = datamem
        self.spill_path = spill_path
        self.spill_limit = spill_limit

    def _core(self):
        """The fields as the core's ``Deployment`` reads them (0 and ``""``: the default)."""
        return {
            "cpu_millicores": self.cpu or None,
            "memory_mb": self.mem or None,
            "shared_memory_mb": self.datamem or None,
            "spill_dir": self.spill_path or None,
            "spill_limit_mb": self.spill_limit or None,
        }

    def __repr__(self):
        return "DeploymentConfig(cpu={}, mem={}, datamem={}, spill_path={!r}, spill_limit={})" \
            .format(self.cpu, self.mem, self.datamem, self.spill_path, self.spill_limit)


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
    cluster token, else the session's token file), ``load_paths`` (directories put first on
    the runtimes' import path, and on the driver's in local mode), ``auto`` with
    ``deployment_config`` (a cluster of the driver's own, started by ``yr.init`` and stopped by
    ``yr.finalize``), and TLS: ``tls_config`` (a ``UserTLSConfig``), or ``enable_tls`` /
    ``enable_mtls`` with ``verify_file_path`` (the CA), ``certificate_file_path``,
    ``private_key_path`` and ``server_name``.

    openYuanrong's fields that tune its own HTTP client and log files (``connection_nums``,
    ``http_ioc_threads_num``, ``invoke_timeout``, ``log_file_size_max``, ``log_file_num_max``,
    ``log_flush_interval``, ``enable_metrics``, ``dedup_logs``, ``in_cluster``) are checked
    and have no effect; ``yr.init`` warns for each one set. Its fields for wiring its own
    runtimes and services (``function_id``, ``rt_server_address``, ...) are 1001 with the
    reason.

    >>> conf = Config(local_mode=True, recycle_time=10, custom_envs={"MODE": "test"})
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
        "load_paths": (list, tuple),
        "auto": bool,
        "deployment_config": DeploymentConfig,
        "tls_config": UserTLSConfig,
        "enable_tls": bool,
        "enable_mtls": bool,
        "certificate_file_path": str,
        "private_key_path": str,
        "verify_file_path": str,
        "server_name": str,
        "log_to_driver": bool,
    }

    # openYuanrong's fields with no counterpart in yr: checked, warned about, no effect.
    _NO_EFFECT = {
        "connection_nums": (int, "yr's drivers keep one connection to their node"),
        "http_ioc_threads_num": (int, "yr has no HTTP frontend client"),
        "invoke_timeout": ((int, float), "yr has no HTTP frontend client; use "
                                         "InvokeOptions.timeout for a call's deadline"),
        "log_file_size_max": (int, "the driver's log file (log_dir) is not rotated"),
        "log_file_num_max": (int, "the driver's log file (log_dir) is not rotated"),
        "log_flush_interval": ((int, float), "the driver's log is written as events happen"),
        "enable_metrics": (bool, "nodes and masters always serve /metrics; drivers serve none"),
        "dedup_logs": (bool, "runtime output is not forwarded to the driver"),
        "in_cluster": (bool, "yr finds its node from server_address or the session"),
    }

    # openYuanrong's fields for wiring its own runtimes and services: refused with why.
    _UNSUPPORTED = {
        "function_id": "yr names functions by their code, not by a deployed function id",
        "cpp_function_id": "use yr.rust_function / yr.rust_instance_class for Rust code",
        "cpp_auto_function_name": "use yr.rust_function / yr.rust_instance_class for Rust "
                                  "code",
        "function_name": "yr names functions by their code, not by a deployed function name",
        "code_dir": "use working_dir or load_paths",
        "rt_server_address": "yr's runtimes find their node themselves",
        "runtime_id": "yr's runtimes are named by their node",
        "master_addr_list": "give server_address (a node) instead",
        "tenant_id": "a yr cluster serves one tenant, authenticated by its token",
        "bypass_datasystem": "yr sends values up to 100 KiB inline and larger ones by "
                             "shared memory on its own",
        "enable_ds_encrypt": "yr's TLS (tls_config) covers the data port",
        "ds_public_key_path": "yr's TLS (tls_config) covers the data port",
        "runtime_public_key_path": "yr's TLS (tls_config) covers the data port",
        "runtime_private_key_path": "yr's TLS (tls_config) covers the data port",
        "private_key_paaswd": "yr reads unencrypted PEM keys",
        "logger": "yr logs through its core (log_level, log_dir)",
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
        if types is None and name in Config._NO_EFFECT:
            types = Config._NO_EFFECT[name][0]
        if types is None:
            if name in Config._UNSUPPORTED:
                raise YRValueError("yr.Config.{} is not supported: {}".format(
                    name, Config._UNSUPPORTED[name]))
            raise YRValueError("yr.Config has no field {!r}; its fields are {}".format(
                name, ", ".join(sorted(Config._FIELDS))))
        if value is not None:
            _typed("Config", name, value, types)
        if name == "log_to_driver" and value:
            raise YRValueError("yr.Config.log_to_driver=True is not supported: runtimes' output "
                               "stays in their node's session logs (<session>/logs)")
        if name == "load_paths" and value is not None:
            for path in value:
                if not isinstance(path, str) or not path:
                    raise YRValueError("Config.load_paths holds directories as non-empty str, "
                                       "got {!r}".format(path))
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

    def load_path_list(self):
        """``load_paths`` as absolute directories (relative ones from the driver's working
        directory)."""
        return [os.path.abspath(path) for path in (getattr(self, "load_paths", None) or ())]

    def _core_fields(self):
        """The fields yr's core takes, by its names."""
        names = {"num_cpus": "local_thread_pool_size", "auth_token": "token"}
        skipped = ("custom_envs", "is_driver", "runtime_env", "env_file", "load_paths",
                   "auto", "deployment_config", "tls_config", "enable_tls", "enable_mtls",
                   "certificate_file_path", "private_key_path", "verify_file_path",
                   "server_name", "log_to_driver") + tuple(Config._NO_EFFECT)
        core = {}
        for name, value in vars(self).items():
            if value is None or name in skipped:
                continue
            core[names.get(name, name)] = value
        if self.runtime_working_dir() is not None:
            core["working_dir"] = self.runtime_working_dir()
        tls = self._tls()
        if tls is not None:
            core["tls"] = tls
        deployment = getattr(self, "deployment_config", None)
        if getattr(self, "auto", None):
            core["deployment"] = (deployment or DeploymentConfig())._core()
        elif deployment is not None:
            raise YRValueError("Config.deployment_config takes effect with auto=True only; set "
                               "auto=True or remove it")
        return core

    def _tls(self):
        """The core's TLS files: ``tls_config``, else the ``enable_tls`` fields; ``None``
        without TLS (1001 if TLS is asked for without its files)."""
        tls_config = getattr(self, "tls_config", None)
        if tls_config is not None:
            return {"certificate": tls_config.module_cert_path,
                    "private_key": tls_config.module_key_path,
                    "ca": tls_config.root_cert_path,
                    "server_name": tls_config.server_name}
        if not (getattr(self, "enable_tls", None) or getattr(self, "enable_mtls", None)):
            return None
        files = {"certificate": getattr(self, "certificate_file_path", None),
                 "private_key": getattr(self, "private_key_path", None),
                 "ca": getattr(self, "verify_file_path", None)}
        missing = [field for name, field in (("certificate", "certificate_file_path"),
                                             ("private_key", "private_key_path"),
                                             ("ca", "verify_file_path")) if not files[name]]
        if missing:
            raise YRValueError("Config.enable_tls needs {}: yr's TLS is mutual, so a driver "
                               "presents a certificate".format(", ".join(missing)))
        files["server_name"] = getattr(self, "server_name", None)
        return files

    def _warn_no_effect(self):
        """Warn once per field set that has no effect in yr."""
        for name, (_, reason) in sorted(Config._NO_EFFECT.items()):
            if getattr(self, name, None) is not None:
                warnings.warn("yr.Config.{} has no effect in yr: {}".format(name, reason),
                              stacklevel=3)

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
