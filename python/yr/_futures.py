"""``ObjectRef`` as a future: ``as_future()`` (a ``concurrent.futures.Future``),
``on_complete(callback)`` and ``await ref`` in asyncio. Each registers one callback with the
core, run on yr's callback thread once the object is finished; reading the finished value there
never waits."""

import asyncio
import concurrent.futures

from yr import _yr


def as_future(ref):
    """A future of the object's value, or of the exception ``yr.get`` would raise."""
    future = concurrent.futures.Future()

    def finished():
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(_yr.get([ref], None)[0])
        except BaseException as error:  # noqa: BLE001 - the future carries any failure
            future.set_exception(error)

    ref._on_finished(finished)
    return future


def on_complete(ref, callback):
    """Call ``callback(ref)`` once the object is finished (with a value or an error)."""
    ref._on_finished(lambda: callback(ref))


def awaitable(ref):
    """An asyncio future of the object's value, for ``await ref``."""
    return asyncio.wrap_future(as_future(ref))
