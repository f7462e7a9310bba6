"""The decorators: ``@yr.invoke`` (stateless functions), ``@yr.instance`` (classes whose
instances keep state) and ``@yr.method`` (per-method ``return_nums``), with the proxies they
return: ``FunctionProxy``, ``InstanceCreator``, ``InstanceProxy`` and ``MethodProxy``."""

import functools
import inspect
import threading
import types

from yr import _yr, apis
from yr._code import Code
from yr.config import InvokeOptions
from yr.exception import YRRuntimeError, YRTypeError, YRValueError

__all__ = ["invoke", "instance", "method", "FunctionProxy", "InstanceCreator",
           "InstanceProxy", "MethodProxy"]

MAX_RETURN_NUMS = 100


def _return_nums(value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise YRTypeError("return_nums must be an int, got {!r}".format(value))
    if not 0 <= value <= MAX_RETURN_NUMS:
        raise YRValueError("return_nums must be in [0, {}], got {}".format(
            MAX_RETURN_NUMS, value))
    return value


def _options(invoke_options, fields):
    base = invoke_options if invoke_options is not None else InvokeOptions()
    if not isinstance(base, InvokeOptions):
        raise YRTypeError("invoke_options must be a yr.InvokeOptions, got {!r}".format(
            type(base).__name__))
    return base.merged(**fields).validate()


def _options_json(options):
    """The options for the core, with ``Config.custom_envs`` and ``runtime_env["env_vars"]``
    under the call's own env_vars."""
    config = apis.config()
    envs = config.runtime_envs() if config is not None else None
    if envs:
        options = options.merged(env_vars=dict(envs, **(options.env_vars or {})))
    return options.to_json()


class _CoreOptions:
    """A proxy's options as the core reads them (``_yr.CallOptions``, from ``_options_json``):
    made at the first call under each ``yr.init``, and shared by the proxy's calls after it."""

    __slots__ = ("_options", "_made")

    def __init__(self, options):
        self._options = options
        self._made = None  # (generation, CallOptions)

    def get(self):
        made = self._made
        generation = apis.generation()
        if made is not None and made[0] == generation:
            return made[1]
        core = _yr.call_options(_options_json(self._options))
        self._made = (generation, core)
        return core


def _split(kwargs):
    return list(kwargs), list(kwargs.values())


def _refs_for(refs, return_nums):
    if return_nums == 0:
        return None
    if return_nums == 1:
        return refs[0]
    return refs


class FunctionProxy:
    """A stateless function: ``f.invoke(*args, **kwargs)`` returns an ``ObjectRef`` (a list of
    them with ``return_nums > 1``, ``None`` with 0) at once; ``f.options(...)`` sets
    options for the calls of the proxy it returns."""

    def __init__(self, func, invoke_options=None, return_nums=1, code=None, initializer=None):
        self._func = func
        self._options = invoke_options if invoke_options is not None else InvokeOptions()
        self._core_options = _CoreOptions(self._options)
        self._return_nums = _return_nums(return_nums)
        self._initializer = initializer
        if code is None:
            code = Code(func if initializer is None else _Initialized(func, initializer))
        self._code = code
        functools.update_wrapper(self, func)

    def __call__(self, *args, **kwargs):
        raise YRRuntimeError("invoke function cannot be called directly; call "
                             "{}.invoke(...) instead".format(self._func.__name__))

    def options(self, invoke_options=None, **fields):
        """A proxy whose calls use these options (an ``InvokeOptions``, and/or its fields)."""
        return FunctionProxy(self._func, _options(invoke_options or self._options, fields),
                             self._return_nums, self._code, self._initializer)

    def invoke(self, *args, **kwargs):
        """Call the function remotely; returns its ``ObjectRef``(s) at once."""
        return_nums = self._return_nums
        if kwargs:
            names, values = _split(kwargs)
            call = [self._code.descriptor(tuple(names), return_nums), *args, *values]
        else:
            call = [self._code.descriptor((), return_nums), *args]
        refs = _yr.invoke_function(call, return_nums, self._core_options.get())
        return refs[0] if return_nums == 1 else _refs_for(refs, return_nums)

    def get_original_func(self):
        """The decorated function."""
        return self._func

    @property
    def __yr_original__(self):
        return self._func

    def __reduce__(self):
        return (FunctionProxy, (self._func, self._options, self._return_nums, None,
                                self._initializer))


class _Initialized:
    """A stateless function with an ``initializer``: the initializer runs once in each process
    that runs the function (each runtime, or the driver in local mode), before the function's
    first call there. If it raises, the call fails with its exception (2002) and the next call
    runs it again."""

    def __init__(self, func, initializer):
        self.func = func
        self.initializer = initializer
        self.__module__ = getattr(func, "__module__", "?")
        self.__qualname__ = getattr(func, "__qualname__", "?")
        self._done = False
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        if not self._done:
            with self._lock:
                if not self._done:
                    self._in_function_globals()()
                    self._done = True
        return self.func(*args, **kwargs)

    def _in_function_globals(self):
        """The initializer, reading and writing the globals the function reads: cloudpickle
        gives a function it pickles by value (a decorated one) a globals dict of its own, so an
        initializer of the same module that sets a global would otherwise set it where the
        function does not look."""
        init, func = self.initializer, self.func
        if (isinstance(init, types.FunctionType) and isinstance(func, types.FunctionType)
                and init.__module__ == func.__module__):
            return types.FunctionType(init.__code__, func.__globals__, init.__name__,
                                      init.__defaults__, init.__closure__)
        return init

    def __reduce__(self):
        return (_Initialized, (self.func, self.initializer))


def invoke(func=None, *, invoke_options=None, return_nums=1, initializer=None):
    """Decorate a function as a stateless yr function: ``@yr.invoke`` or
    ``@yr.invoke(invoke_options=..., return_nums=N, initializer=f)``. ``initializer`` (a
    function of no arguments) runs once in each runtime before the function's first call
    there, for example to load a model::

        @yr.invoke(initializer=load_model)
        def predict(x):
            return MODEL(x)
    """
    if initializer is not None and not callable(initializer):
        raise YRTypeError("initializer must be a function of no arguments, got {!r}".format(
            initializer))

    def wrap(f):
        if isinstance(f, type):
            raise YRTypeError("@yr.invoke decorates functions; use @yr.instance for a class")
        options = invoke_options.validate() if invoke_options is not None else None
        return FunctionProxy(f, options, return_nums, initializer=initializer)

    return wrap(func) if func is not None else wrap


def method(func=None, *, return_nums=1, **ignored):
    """Set a method's ``return_nums``: ``@yr.method(return_nums=2)``."""
    def wrap(f):
        f.__yr_return_nums__ = _return_nums(return_nums)
        return f

    return wrap(func) if func is not None else wrap


def _method_kinds(cls):
    """What a handle needs to know of its class's methods: ``return_nums`` where set, and
    which are ``async def``."""
    kinds = {}
    for name in dir(cls):
        attribute = getattr(cls, name, None)
        count = getattr(attribute, "__yr_return_nums__", 1)
        is_async = inspect.iscoroutinefunction(attribute)
        if count != 1 or is_async:
            kinds[name] = (count, is_async)
    return kinds


def _instance_options(current, invoke_options, name, namespace, lifetime, get_if_exists,
                      fields):
    """An instance's options: ``invoke_options`` (else ``current``) with openYuanrong's
    keywords and any other fields."""
    base = invoke_options or current
    if name is not None:
        fields["name"] = name
    if namespace is not None:
        fields["namespace"] = namespace
    if get_if_exists is not None:
        fields["get_if_exists"] = bool(get_if_exists)
    if lifetime is not None:
        if lifetime != "detached":
            raise YRValueError("lifetime must be \"detached\", got {!r}".format(lifetime))
        fields["custom_extensions"] = dict(base.custom_extensions or {}, lifecycle="detached")
    return _options(base, fields)


class InstanceCreator:
    """A class whose instances run remotely and keep their state: ``Cls.invoke(*args)``
    returns an ``InstanceProxy`` at once; ``Cls.options(...)`` sets options (``name``,
    ``namespace``, ``lifetime="detached"``, ``get_if_exists``, or an ``InvokeOptions``)."""

    def __init__(self, cls, invoke_options=None, code=None):
        self.cls = cls
        self._options = invoke_options if invoke_options is not None else InvokeOptions()
        self._core_options = _CoreOptions(self._options)
        self._code = code if code is not None else Code(cls)
        self._methods = _method_kinds(cls)
        self._class_name = "{}.{}".format(getattr(cls, "__module__", "?"),
                                          getattr(cls, "__qualname__", cls.__name__))
        functools.update_wrapper(self, cls, updated=())

    def __call__(self, *args, **kwargs):
        raise YRRuntimeError("an instance class cannot be instantiated directly; call "
                             "{}.invoke(...) instead".format(self.cls.__name__))

    def options(self, invoke_options=None, *, name=None, namespace=None, lifetime=None,
                get_if_exists=None, **fields):
        """A creator whose instances use these options."""
        options = _instance_options(self._options, invoke_options, name, namespace, lifetime,
                                    get_if_exists, fields)
        return InstanceCreator(self.cls, options, self._code)

    def invoke(self, *args, **kwargs):
        """Create an instance remotely (its constructor runs there); returns its handle at
        once. A constructor failure surfaces on the instance's calls."""
        names, values = _split(kwargs)
        descriptor = self._code.descriptor(tuple(names))
        instance_id = _yr.create_instance([descriptor, *args, *values],
                                          self._core_options.get(), self._class_name)
        return InstanceProxy(instance_id, self._methods)

    def get_instance(self, name, namespace="", timeout=60):
        """A handle to an existing named instance of this class."""
        instance_id = _yr.get_named_instance(name, namespace or "", float(timeout))
        return InstanceProxy(instance_id, self._methods)

    @property
    def __yr_original__(self):
        return self.cls

    def __reduce__(self):
        return (InstanceCreator, (self.cls, self._options))


def instance(cls=None, *, invoke_options=None):
    """Decorate a class as a yr instance class: ``@yr.instance`` or
    ``@yr.instance(invoke_options=...)``."""
    def wrap(c):
        if not isinstance(c, type):
            raise YRTypeError("@yr.instance decorates classes; use @yr.invoke for a function")
        options = invoke_options.validate() if invoke_options is not None else None
        return InstanceCreator(c, options)

    return wrap(cls) if cls is not None else wrap


class InstanceProxy:
    """A handle to an instance: ``ins.method.invoke(...)`` calls a method (in order),
    ``ins.terminate()`` ends it. Handles can be passed to other calls."""

    def __init__(self, instance_id, methods):
        self.instance_id = instance_id
        self._methods = dict(methods)

    @property
    def real_id(self):
        return self.instance_id

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return_nums, is_async = self._methods.get(name, (1, False))
        method = MethodProxy(self, name, return_nums, is_async)
        self.__dict__[name] = method  # found without __getattr__ from now on
        return method

    def terminate(self, is_sync=False):
        """End the instance, running its ``__yr_shutdown__`` hook; with ``is_sync``, wait
        until it has exited."""
        _yr.terminate_instance(self.instance_id, bool(is_sync))

    def __repr__(self):
        return "InstanceProxy({})".format(self.instance_id)

    def __reduce__(self):
        return (InstanceProxy, (self.instance_id, self._methods))


_method_descriptors = {}  # (method, keyword names, return_nums) -> its PreparedValue


def _method_descriptor(name, names, return_nums):
    """A method call's descriptor, pickled once for all calls with these keyword names."""
    key = (name, names, return_nums)
    descriptor = _method_descriptors.get(key)
    if descriptor is None:
        descriptor = _yr.prepare({"method": name, "kwargs": list(names),
                                  "return_nums": return_nums})
        if len(_method_descriptors) < 4096:
            _method_descriptors[key] = descriptor
    return descriptor


class MethodProxy:
    """A method of an instance: ``.invoke(*args, **kwargs)`` returns its ``ObjectRef``(s)."""

    def __init__(self, proxy, name, return_nums, is_async=False, options=None):
        self._proxy = proxy
        self._name = name
        self._return_nums = return_nums
        self._is_async = is_async
        self._descriptor = _method_descriptor(name, (), return_nums)
        self._core_options = None if options is None else _yr.call_options(options.to_json())

    def invoke(self, *args, **kwargs):
        return_nums = self._return_nums
        if kwargs:
            names, values = _split(kwargs)
            call = [_method_descriptor(self._name, tuple(names), return_nums), *args, *values]
        else:
            call = [self._descriptor, *args]
        refs = _yr.invoke_method(self._proxy.instance_id, call, return_nums, self._is_async,
                                 self._core_options)
        return refs[0] if return_nums == 1 else _refs_for(refs, return_nums)

    def options(self, invoke_options=None, **fields):
        """This method's calls with options: an ``InvokeOptions`` and/or its fields. A method
        call honours ``timeout_s`` (its results fail with 4005 if it has not finished by then);
        the fields that belong to the instance (resources, retries, names, ...) are refused with
        1001 naming them."""
        return MethodProxy(self._proxy, self._name, self._return_nums, self._is_async,
                           _options(invoke_options, fields))


