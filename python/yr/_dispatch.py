"""Runs calls: the Python side of the core's entry points (``yr._yr``'s ``calls``), in a local
mode driver's pool threads and in runtime processes alike. Each call's first argument is a
descriptor (``yr._code``); the code it names is loaded once per process and cached by hash.

Calls from another language (a Rust driver, design 018) name their code instead: a module and
a function or class in it, imported once per process, or a method by name. Their descriptor and
arguments arrive decoded from MessagePack (``call_named_function``, ``construct_named``,
``call_named_method``), and ``yr._yr`` encodes their results back.

Every function here answers ``(True, value)`` or ``(False, code, message, payload)``: a user
exception becomes 2002 with the pickled ``(exception, traceback, repr)`` as payload, code that
cannot be loaded 2001 naming the module, arguments that cannot be unpickled 4003, and a name
that a call from another language gives but Python does not have 1015."""

import asyncio
import importlib
import inspect
import os
import sys
import threading
import traceback
from types import CoroutineType

from yr import _yr, serialization
from yr.exception import USER_CODE_LOAD, USER_FUNCTION_EXCEPTION

DESERIALIZATION_FAILED = 4003
FUNCTION_META_NOT_FOUND = 1015

# Set by ``yr._runtime``: this process is a runtime, which takes the driver's paths.
IN_RUNTIME = False

_cache = {}  # hash -> (code object, its ObjectRef, kept so the object stays here)
_named = {}  # (module, name) -> the function or class a call from another language named
_lock = threading.Lock()
_moved = False


class _Failed(Exception):
    def __init__(self, code, message, payload=b""):
        super().__init__(message)
        self.answer = (False, code, message, payload)


def _take_paths(sys_path):
    global _moved
    path, cwd = sys_path
    for entry in path:
        if entry not in sys.path:
            sys.path.append(entry)
    if not _moved and os.path.isdir(cwd):
        os.chdir(cwd)
        _moved = True


def _load(descriptor):
    digest = descriptor["hash"]
    cached = _cache.get(digest)
    if cached is not None:
        return cached[0]
    with _lock:
        cached = _cache.get(digest)
        if cached is not None:
            return cached[0]
        if IN_RUNTIME:
            _take_paths(descriptor["sys_path"])
        reference = descriptor["code"]
        try:
            from yr import apis

            obj = serialization.loads(apis.get(reference, timeout=-1))
        except ImportError as error:
            module = getattr(error, "name", None) or str(error)
            raise _Failed(USER_CODE_LOAD, (
                "cannot load {}: module {!r} cannot be imported in the runtime ({}: {}); "
                "install it where the runtimes run, or put its directory on the driver's "
                "sys.path").format(descriptor["name"], module, type(error).__name__, error))
        except Exception as error:  # noqa: BLE001 - any failure to load user code
            raise _Failed(USER_CODE_LOAD, "cannot load {}: {}: {}".format(
                descriptor["name"], type(error).__name__, error))
        obj = getattr(obj, "__yr_original__", obj)
        _cache[digest] = (obj, reference)
        return obj


_descriptors = {}  # a descriptor's pickled bytes -> the descriptor
_DESCRIPTORS_MAX = 4096


def _descriptor(blob):
    """The call's descriptor: the driver sends the same bytes for every call of one function
    or method (``_yr.prepare``), so each is unpickled once."""
    descriptor = _descriptors.get(blob) if type(blob) is bytes else None
    if descriptor is None:
        descriptor = serialization.loads(blob)
        if type(blob) is bytes:
            if len(_descriptors) >= _DESCRIPTORS_MAX:
                _descriptors.clear()
            _descriptors[blob] = descriptor
    return descriptor


def _arguments(descriptor, blobs):
    """The call's positional and keyword arguments (``blobs[0]`` is the descriptor)."""
    try:
        values = [serialization.loads(blob) for blob in blobs[1:]]
    except Exception as error:  # noqa: BLE001 - any failure to unpickle an argument
        raise _Failed(DESERIALIZATION_FAILED, "cannot unpickle an argument of {}: {}: {}".format(
            descriptor.get("name", descriptor.get("method", "?")), type(error).__name__, error))
    names = descriptor["kwargs"]
    if not names:
        return values, {}
    split = len(values) - len(names)
    return values[:split], dict(zip(names, values[split:]))


_loop = None
_loop_lock = threading.Lock()


def _event_loop():
    """The process's event loop for ``async def`` methods, on a thread of its own. The
    executor threads of an instance with ``concurrency`` N queue up to N calls for it
    (``yr._yr``'s ``async_calls``), which run as interleaving tasks."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            loop.add_reader(_yr._async_wake_fd(), _start_async_calls, loop)
            threading.Thread(target=loop.run_forever, name="yr-event-loop", daemon=True).start()
            _loop = loop
        return _loop


def _settle(result):
    """A method's result: a coroutine runs to its end on the event loop (a method called
    through a handle that does not know the method is ``async def``)."""
    if type(result) is CoroutineType:
        return asyncio.run_coroutine_threadsafe(result, _event_loop()).result()
    return result


def _start_async_calls(loop):
    """On the loop: start the queued ``async def`` method calls, each as a task that sends
    its answer when it ends."""
    for reply, instance, blobs in _yr._take_async_calls():
        try:
            descriptor = _descriptor(blobs[0])
            args, kwargs = _arguments(descriptor, blobs)
        except _Failed as failed:
            reply.send(failed.answer)
            continue
        try:
            result = getattr(instance, descriptor["method"])(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the user's failure, sent to the caller
            reply.send(_user_failure(error))
            continue
        if type(result) is not CoroutineType:
            reply.send(_returned(instance, descriptor, result))
            continue
        loop.create_task(_answer_async_call(reply, instance, descriptor, result))


async def _answer_async_call(reply, instance, descriptor, coroutine):
    """Run the method's coroutine and send its answer from the same task (a done callback
    would take one more turn of the loop)."""
    try:
        result = await coroutine
    except BaseException as error:  # noqa: BLE001 - the user's failure, sent to the caller
        reply.send(_user_failure(error))
        if not isinstance(error, Exception):
            raise
        return
    reply.send(_returned(instance, descriptor, result))


def _returned(instance, descriptor, result):
    """The answer of a method that returned ``result``."""
    return_nums = descriptor["return_nums"]
    if return_nums == 1:
        return (True, [result])
    try:
        name = "{}.{}".format(type(instance).__qualname__, descriptor["method"])
        return (True, _results(name, result, return_nums))
    except _Failed as failed:
        return failed.answer


def _user_failure(error):
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        payload = serialization.dumps((error, text, repr(error)))
    except Exception:  # noqa: BLE001 - an exception that cannot be pickled
        payload = serialization.dumps((None, text, repr(error)))
    return (False, USER_FUNCTION_EXCEPTION, text, payload)


def _results(name, result, return_nums):
    if return_nums == 1:
        return [result]
    if return_nums == 0:
        return []
    try:
        results = list(result)
    except TypeError:
        results = None
    if results is None or len(results) != return_nums:
        raise _Failed(USER_FUNCTION_EXCEPTION, "{} returned {!r}, but return_nums is {}: "
                      "return a sequence of that many values".format(name, result, return_nums))
    return results


def _run_user_code(name, return_nums, call, /, *args, **kwargs):
    """Run the user's code, ``call(*args, **kwargs)``; its exception is the call's failure
    (2002). ``name`` (a str, or a function that makes it, called only when needed) names the
    code in a message; ``return_nums`` ``None`` (a constructor) returns the result as it is."""
    try:
        result = call(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the user's failure, sent to the caller
        return _user_failure(error)
    if return_nums is None:
        # A constructor: the instance itself.
        return (True, result)
    if return_nums == 1:
        return (True, [result])
    try:
        return (True, _results(name() if callable(name) else name, result, return_nums))
    except _Failed as failed:
        return failed.answer


def call_function(blobs):
    """Run a stateless function."""
    try:
        descriptor = _descriptor(blobs[0])
        function = _load(descriptor)
        args, kwargs = _arguments(descriptor, blobs)
    except _Failed as failed:
        return failed.answer
    return _run_user_code(lambda: descriptor["name"], descriptor["return_nums"], function,
                          *args, **kwargs)


def construct(blobs):
    """Make an instance of a class: the answer's value is the instance."""
    try:
        descriptor = _descriptor(blobs[0])
        cls = _load(descriptor)
        args, kwargs = _arguments(descriptor, blobs)
    except _Failed as failed:
        return failed.answer
    try:
        return (True, cls(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - the user's failure, sent to the caller
        return _user_failure(error)


def _call_and_settle(method, /, *args, **kwargs):
    return _settle(method(*args, **kwargs))


def call_method(instance, blobs):
    """Call a method of an instance."""
    try:
        descriptor = _descriptor(blobs[0])
        args, kwargs = _arguments(descriptor, blobs)
    except _Failed as failed:
        return failed.answer
    name = descriptor["method"]

    def qualified():
        return "{}.{}".format(type(instance).__qualname__, name)

    try:
        method = getattr(instance, name)
    except Exception as error:  # noqa: BLE001 - the user's failure, sent to the caller
        return _user_failure(error)
    return _run_user_code(qualified, descriptor["return_nums"], _call_and_settle, method,
                          *args, **kwargs)


def shutdown(instance, grace_period_second):
    """Run the instance's ``__yr_shutdown__`` hook, if it has one."""
    hook = getattr(instance, "__yr_shutdown__", None)
    if hook is not None:
        hook(grace_period_second)


_MISSING = object()


def _import_named(module_name, name, sys_path):
    """The function or class ``name`` (dotted within the module) of module ``module_name``;
    a name Python does not have is 1015."""
    qualified = "{}.{}".format(module_name, name)
    if IN_RUNTIME:
        _take_paths(sys_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _Failed(FUNCTION_META_NOT_FOUND, (
                "Python function or class {} is not found: there is no module {!r} on the "
                "runtime's sys.path {}; check the module's name, or add its directory to the "
                "handle's python_path").format(qualified, module_name, sys.path))
        raise _Failed(USER_CODE_LOAD, "cannot load {}: module {!r} cannot be imported in the "
                      "runtime ({}: {})".format(qualified, module_name,
                                                type(error).__name__, error))
    except Exception as error:  # noqa: BLE001 - any failure to import user code
        raise _Failed(USER_CODE_LOAD, "cannot load {}: importing module {!r} failed: {}: {}"
                      .format(qualified, module_name, type(error).__name__, error))
    found = module
    for part in name.split("."):
        found = getattr(found, part, _MISSING)
        if found is _MISSING:
            raise _Failed(FUNCTION_META_NOT_FOUND, (
                "Python function or class {} is not found: module {!r} ({}) has no {!r}; "
                "check the name").format(qualified, module_name,
                                         getattr(module, "__file__", "?"), name))
    return getattr(found, "__yr_original__", found)


def _load_named(descriptor, want_class):
    """The function (or, with ``want_class``, the class) a call from another language names,
    imported once per process."""
    key = (descriptor["module"], descriptor["name"])
    found = _named.get(key)
    if found is None:
        with _lock:
            found = _named.get(key)
            if found is None:
                found = _import_named(key[0], key[1], descriptor["sys_path"])
                _named[key] = found
    qualified = "{}.{}".format(*key)
    if want_class and not isinstance(found, type):
        raise _Failed(FUNCTION_META_NOT_FOUND, "{} is not a class (a {}); create instances of "
                      "a class, call a function with python_function".format(
                          qualified, type(found).__name__))
    if not want_class and (isinstance(found, type) or not callable(found)):
        raise _Failed(FUNCTION_META_NOT_FOUND, "{} is not a function (a {}); call a function, "
                      "create instances of a class with python_instance_class".format(
                          qualified, type(found).__name__))
    return found


def _run_named(descriptor, args, want_class, return_nums):
    try:
        found = _load_named(descriptor, want_class)
    except _Failed as failed:
        return failed.answer
    name = "{}.{}".format(descriptor["module"], descriptor["name"])
    return _run_user_code(name, return_nums, lambda: found(*args))


def call_named_function(descriptor, args):
    """Run the function a call from another language names, with its decoded arguments."""
    return _run_named(descriptor, args, False, descriptor["return_nums"])


def construct_named(descriptor, args):
    """Make an instance of the class a call from another language names."""
    return _run_named(descriptor, args, True, None)


def call_named_method(instance, descriptor, args):
    """Call the method a call from another language names; one the instance does not have is
    1015."""
    name = descriptor["method"]
    qualified = "{}.{}".format(type(instance).__qualname__, name)
    method = getattr(instance, name, _MISSING) if not name.startswith("_") else _MISSING
    if method is _MISSING or not callable(method):
        return (False, FUNCTION_META_NOT_FOUND, "method {} is not found: class {} has no public "
                "method {!r}; check the name".format(qualified, type(instance).__qualname__,
                                                     name), b"")
    return _run_user_code(qualified, descriptor["return_nums"],
                          lambda: _settle(method(*args)))
