"""yr's exceptions, as openYuanrong's Python SDK names them.

Every failure the core reports arrives here through ``_from_core`` with its code, module code,
message and payload, and becomes one of these classes:

- ``YRValueError`` (a ``ValueError``) for invalid arguments: codes 1001 and 1006;
- ``YRTimeoutError`` (a ``TimeoutError``) for a get that timed out: code 4005;
- ``YRInvokeError`` for a user exception raised remotely (code 2002, or 4306 for a failed
  dependency). ``yr.get`` raises it as a class deriving from both ``YRInvokeError`` and the
  original exception's type, so ``except ValueError`` catches a remote ``ValueError``; its
  ``str()`` includes the remote traceback;
- ``YRRuntimeError`` (a ``RuntimeError``) for everything else;
- ``YRTypeError`` (a ``TypeError``) for arguments of the wrong type, raised by the SDK itself.
"""

import pickle

__all__ = [
    "YRError",
    "YRRuntimeError",
    "YRTimeoutError",
    "YRValueError",
    "YRTypeError",
    "YRInvokeError",
]

# Module codes (docs/error-codes.md): 10 core, 20 runtime.
MODULE_CORE = 10
MODULE_RUNTIME = 20

PARAM_INVALID = 1001
USER_CODE_LOAD = 2001
USER_FUNCTION_EXCEPTION = 2002
INNER_SYSTEM_ERROR = 3003
GET_TIMEOUT = 4005
DEPENDENCY_FAILED = 4306


class YRError(Exception):
    """A yr failure: ``code`` (yr's error table, ``yr errors CODE``), ``module_code`` (the
    module that raised it) and ``message`` (what happened and what to do)."""

    def __init__(self, message="", code=INNER_SYSTEM_ERROR, module_code=MODULE_RUNTIME):
        super().__init__(message)
        self.code = code
        self.module_code = module_code
        self.message = message

    def __str__(self):
        return self.message

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.code, self.module_code))


def _rebuild(cls, message, code, module_code):
    return cls(message, code, module_code)


class YRRuntimeError(YRError, RuntimeError):
    """A failure of the system or of a call."""


class YRTimeoutError(YRError, TimeoutError):
    """A wait ran out of time (4005)."""

    def __init__(self, message="", code=GET_TIMEOUT, module_code=MODULE_RUNTIME):
        super().__init__(message, code, module_code)


class YRValueError(YRError, ValueError):
    """An invalid argument (1001, 1006)."""

    def __init__(self, message="", code=PARAM_INVALID, module_code=MODULE_RUNTIME):
        super().__init__(message, code, module_code)


class YRTypeError(YRError, TypeError):
    """An argument of the wrong type."""

    def __init__(self, message="", code=PARAM_INVALID, module_code=MODULE_RUNTIME):
        super().__init__(message, code, module_code)


class YRInvokeError(YRRuntimeError):
    """A user exception raised in a remote function or method.

    ``cause`` is the original exception (``None`` if it could not be pickled; then
    ``cause_repr`` describes it) and ``traceback_str`` the remote traceback."""

    def __init__(self, cause=None, traceback_str="", cause_repr="",
                 code=USER_FUNCTION_EXCEPTION, module_code=MODULE_CORE):
        self.cause = cause
        self.traceback_str = traceback_str
        self.cause_repr = cause_repr or repr(cause)
        super().__init__(traceback_str or self.cause_repr, code, module_code)

    def __reduce__(self):
        return (YRInvokeError, (self.cause, self.traceback_str, self.cause_repr,
                                self.code, self.module_code))

    def origin_error(self):
        """This error as an instance of a class deriving from both ``YRInvokeError`` and the
        cause's type, so that ``except <cause's type>`` catches it."""
        cause_type = type(self.cause)
        if self.cause is None or not issubclass(cause_type, Exception):
            return self
        try:
            derived = type(
                "YRInvokeError({})".format(cause_type.__name__),
                (YRInvokeError, cause_type),
                {"__module__": __name__, "__reduce__": YRInvokeError.__reduce__,
                 "__str__": YRInvokeError.__str__, "__init__": YRInvokeError.__init__},
            )
            error = derived.__new__(derived)
        except TypeError:
            # The cause's type cannot be combined (a layout conflict): the plain class.
            return self
        YRInvokeError.__init__(error, self.cause, self.traceback_str, self.cause_repr,
                               self.code, self.module_code)
        error.args = (str(error),)
        return error


def _describe(prefix, code, module_code, message):
    text = "code: {}, module code: {}, msg: {}".format(code, module_code, message)
    return "{}, {}".format(prefix, text) if prefix else text


def _from_core(code, module_code, message, payload, prefix):
    """The exception for an error of the core (called by ``yr._yr``)."""
    if payload and code in (USER_FUNCTION_EXCEPTION, DEPENDENCY_FAILED):
        try:
            cause, traceback_str, cause_repr = pickle.loads(payload)
        except Exception as error:  # noqa: BLE001 - the cause's class may not exist here
            return YRInvokeError(None, message, "cannot unpickle the remote exception ({!r}): "
                                 "{}".format(error, message), code, module_code)
        return YRInvokeError(cause, traceback_str, cause_repr, code, module_code).origin_error()
    text = _describe(prefix, code, module_code, message)
    if code in (PARAM_INVALID, 1006):
        return YRValueError(text, code, module_code)
    if code == GET_TIMEOUT:
        return YRTimeoutError(text, code, module_code)
    return YRRuntimeError(text, code, module_code)
