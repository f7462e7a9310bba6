"""Calls from Python to Rust (docs/design/018), as openYuanrong's ``cpp_function`` and
``cpp_instance_class`` call C++: the code lives in a program built with the ``yr`` crate
(``#[yr::invoke]`` functions, ``#[yr::instance]`` classes), which the node runs as the runtime.

    add = yr.rust_function("my_app::add", executable="/opt/my_app/bin/worker")
    assert yr.get(add.invoke(1, 2)) == 3

    Counter = yr.rust_instance_class("my_app::Counter", executable="/opt/my_app/bin/worker")
    counter = Counter.invoke(10)              # my_app::Counter::new(10)
    assert yr.get(counter.add.invoke(5)) == 15  # my_app::Counter::add

Names are Rust paths: ``crate::function``, ``crate::Class`` (the constructor is
``crate::Class::new`` unless ``constructor_name`` says otherwise; a method ``m`` is
``crate::Class::m``). Arguments are positional and cross as MessagePack: ``None``, ``bool``,
``int``, ``float``, ``str``, ``bytes``, ``list``/``tuple``, ``dict`` and ``ObjectRef``; results
come back the same way (a Rust struct as a ``dict``). A name the program does not have is 1015.

The executable is ``executable=``, else ``$YR_RUST_EXECUTABLE``; the node runs it only if the
driver's user (or root) owns it and every directory above it and no other user can write them.
"""

import os

from yr import _yr
from yr.config import InvokeOptions
from yr.decorator import (InstanceProxy, _instance_options, _options, _options_json, _refs_for,
                          _return_nums)
from yr.exception import YRTypeError, YRValueError

__all__ = ["rust_function", "rust_instance_class", "RustFunctionProxy", "RustInstanceCreator",
           "RustInstanceProxy", "RustMethodProxy"]


def _executable(executable):
    if executable is None:
        executable = os.environ.get("YR_RUST_EXECUTABLE")
    if not executable:
        raise YRValueError("name the Rust program that holds the code: executable=... (or "
                           "set YR_RUST_EXECUTABLE)")
    if not isinstance(executable, (str, os.PathLike)):
        raise YRTypeError("executable must be a path, got {!r}".format(
            type(executable).__name__))
    return os.path.abspath(os.fspath(executable))


def _name(value, what):
    if not isinstance(value, str) or not value:
        raise YRTypeError("{} must be a non-empty str (a Rust path such as "
                          "\"my_app::add\"), got {!r}".format(what, value))
    return value


def _positional(kwargs, name):
    if kwargs:
        raise YRTypeError("{} takes positional arguments only (Rust has no keyword "
                          "arguments), got {}".format(name, ", ".join(sorted(kwargs))))


class RustFunctionProxy:
    """A Rust function: ``f.invoke(*args)`` returns an ``ObjectRef`` (a list of them with
    ``return_nums > 1``) at once; ``f.options(...)`` sets options for the calls of the proxy it
    returns."""

    def __init__(self, name, executable, return_nums=1, invoke_options=None):
        self.name = name
        self.executable = executable
        self._return_nums = _return_nums(return_nums)
        self._options = invoke_options if invoke_options is not None else InvokeOptions()

    def options(self, invoke_options=None, **fields):
        """A proxy whose calls use these options (an ``InvokeOptions``, and/or its fields)."""
        return RustFunctionProxy(self.name, self.executable, self._return_nums,
                                 _options(invoke_options or self._options, fields))

    def invoke(self, *args, **kwargs):
        """Call the function remotely; returns its ``ObjectRef``(s) at once."""
        _positional(kwargs, self.name)
        refs = _yr.invoke_rust_function(self.executable, self.name, list(args),
                                        self._return_nums, _options_json(self._options))
        return _refs_for(refs, self._return_nums)

    def __repr__(self):
        return "RustFunctionProxy({!r}, executable={!r})".format(self.name, self.executable)

    def __reduce__(self):
        return (RustFunctionProxy, (self.name, self.executable, self._return_nums,
                                    self._options))


def rust_function(function_name, executable=None, return_nums=1):
    """A proxy of the Rust function ``function_name`` (its path, ``crate::function``) in the
    program at ``executable``, like openYuanrong's ``cpp_function``."""
    return RustFunctionProxy(_name(function_name, "function_name"), _executable(executable),
                             return_nums)


class RustInstanceCreator:
    """A Rust class: ``Cls.invoke(*args)`` runs its constructor remotely and returns a
    ``RustInstanceProxy`` at once; ``Cls.options(...)`` sets options (``name``,
    ``namespace``, ``lifetime="detached"``, ``get_if_exists``, or an ``InvokeOptions`` and
    its fields); ``Cls.get_instance(name)`` finds a named one."""

    def __init__(self, class_name, constructor_name, executable, invoke_options=None):
        self.class_name = class_name
        self.constructor_name = constructor_name
        self.executable = executable
        self._options = invoke_options if invoke_options is not None else InvokeOptions()

    def get_class_name(self):
        """The class's path."""
        return self.class_name

    def get_factory_name(self):
        """The constructor's path (openYuanrong calls it the factory)."""
        return self.constructor_name

    def options(self, invoke_options=None, *, name=None, namespace=None, lifetime=None,
                get_if_exists=None, **fields):
        """A creator whose instances use these options (as ``InstanceCreator.options``)."""
        options = _instance_options(self._options, invoke_options, name, namespace, lifetime,
                                    get_if_exists, fields)
        return RustInstanceCreator(self.class_name, self.constructor_name, self.executable,
                                   options)

    def get_instance(self, name, namespace="", timeout=60):
        """A handle to an existing named instance of this class."""
        instance_id = _yr.get_named_instance(name, namespace or "", float(timeout))
        return RustInstanceProxy(instance_id, self.class_name)

    def invoke(self, *args, **kwargs):
        """Create an instance remotely; returns its handle at once. A constructor the program
        does not have (1015), or one that fails, surfaces on the instance's calls."""
        _positional(kwargs, self.constructor_name)
        instance_id = _yr.create_rust_instance(self.executable, self.constructor_name,
                                               self.class_name, list(args),
                                               _options_json(self._options))
        return RustInstanceProxy(instance_id, self.class_name)

    def __repr__(self):
        return "RustInstanceCreator({!r}, executable={!r})".format(self.class_name,
                                                                  self.executable)


def rust_instance_class(class_name, constructor_name=None, executable=None):
    """A creator of instances of the Rust class ``class_name`` (its path, ``crate::Class``,
    declared with ``#[yr::instance]``) in the program at ``executable``, like openYuanrong's
    ``cpp_instance_class``. ``constructor_name`` is the constructor's name in the class
    (default ``"new"``) or its whole path."""
    class_name = _name(class_name, "class_name")
    constructor_name = _name(constructor_name or "new", "constructor_name")
    if "::" not in constructor_name:
        constructor_name = "{}::{}".format(class_name, constructor_name)
    return RustInstanceCreator(class_name, constructor_name, _executable(executable))


class RustInstanceProxy(InstanceProxy):
    """A handle to a Rust instance: ``ins.method.invoke(*args)`` calls its method
    ``crate::Class::method`` (in order), ``ins.terminate()`` ends it. Handles can be passed to
    other calls."""

    def __init__(self, instance_id, class_name):
        super().__init__(instance_id, {})
        self.class_name = class_name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return RustMethodProxy(self, name)

    def __repr__(self):
        return "RustInstanceProxy({}, {})".format(self.class_name, self.instance_id)

    def __reduce__(self):
        return (RustInstanceProxy, (self.instance_id, self.class_name))


class RustMethodProxy:
    """A method of a Rust instance: ``.invoke(*args)`` returns its ``ObjectRef``."""

    def __init__(self, proxy, name):
        self._proxy = proxy
        self._name = name

    def invoke(self, *args, **kwargs):
        path = "{}::{}".format(self._proxy.class_name, self._name)
        _positional(kwargs, path)
        refs = _yr.invoke_rust_method(self._proxy.instance_id, path, self._proxy.class_name,
                                      list(args))
        return refs[0]

    def options(self, invoke_options=None, **fields):
        raise YRValueError("yr does not support per-method options yet; set options on the "
                           "instance with Cls.options(...)")
