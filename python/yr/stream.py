"""Streams: the data system's publish/subscribe (openYuanrong's ``create_stream_producer`` and
``create_stream_consumer``), shared by the drivers and runtimes of a cluster (in local mode, by
this process). A producer sends elements (bytes) in order; each subscription of the stream
gets every element (``SubscriptionType.STREAM``), or shares them between its consumers in turn
(``ROUND_ROBIN``, which openYuanrong declares and yr implements). A consumer receives, then
acks what it handled; a full stream makes ``send`` wait for room, then fail with 4202. Names,
configurations and elements are checked by the core, with the Rust SDK's codes (1001).

    producer = yr.create_stream_producer("events", yr.ProducerConfig(delay_flush_time=0))
    consumer = yr.create_stream_consumer("events", yr.SubscriptionConfig("audit"))
    producer.send(yr.Element(b"hello"))
    [element] = consumer.receive(timeout_ms=1000, expect_num=1)
    consumer.ack(element.id)
"""

import enum

from yr import _yr
from yr.exception import YRTypeError, YRValueError

__all__ = ["Element", "ProducerConfig", "SubscriptionConfig", "SubscriptionType", "Producer",
           "Consumer", "create_stream_producer", "create_stream_consumer", "delete_stream",
           "query_global_producers_num", "query_global_consumers_num"]

# How long a send waits for room when no timeout is given (openYuanrong waits without a bound
# is not offered: a stream whose consumers stopped would hang the producer).
DEFAULT_SEND_TIMEOUT_MS = 60_000


def _int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise YRTypeError("{} must be an int, got {!r}".format(name, value))
    if value < low:
        raise YRValueError("{} must be >= {}, got {}".format(name, low, value))
    return value


class SubscriptionType(enum.IntEnum):
    """How the consumers of a subscription share its elements."""
    STREAM = 0
    ROUND_ROBIN = 1
    KEY_PARTITIONS = 2


class Element:
    """One element: its bytes (``value``) and, once received, its id (``id``, 1 for the
    stream's first element)."""

    __slots__ = ("value", "id")

    def __init__(self, value, ele_id=0):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise YRTypeError("an element's value must be bytes, got {}".format(
                type(value).__name__))
        self.value = bytes(value)
        self.id = _int("ele_id", ele_id)

    @property
    def ele_id(self):
        """The element's id (openYuanrong's name)."""
        return self.id

    def __repr__(self):
        return "Element(id={}, {} bytes)".format(self.id, len(self.value))


class ProducerConfig:
    """A producer's configuration. ``delay_flush_time`` (ms, default 5; 0 flushes each element
    at once), ``page_size`` (bytes, default 1 MiB, a multiple of 4 KiB), ``max_stream_size``
    (bytes not yet acked by every subscription, default 100 MiB), ``auto_clean_up`` (remove
    the stream when its last producer or consumer closes) and ``retain_for_num_consumers``
    (keep elements for the first N subscriptions, even those created later). yr does not
    support ``encrypt_stream``, a ``reserve_size`` other than 0, a negative
    ``delay_flush_time`` (no automatic flush) or an ``extend_config`` yet: they are refused with
    1001."""

    def __init__(self, delay_flush_time=5, page_size=1024 * 1024,
                 max_stream_size=100 * 1024 * 1024, auto_clean_up=False, encrypt_stream=False,
                 retain_for_num_consumers=0, reserve_size=0, extend_config=None):
        if isinstance(delay_flush_time, int) and not isinstance(delay_flush_time, bool) \
                and delay_flush_time < 0:
            raise YRValueError("yr does not support delay_flush_time < 0 (no automatic flush) "
                               "yet; use 0 to flush every element, or a delay in ms")
        self.delay_flush_time = _int("delay_flush_time", delay_flush_time)
        self.page_size = _int("page_size", page_size, 1)
        self.max_stream_size = _int("max_stream_size", max_stream_size, 1)
        self.auto_clean_up = bool(auto_clean_up)
        if encrypt_stream:
            raise YRValueError("yr does not support encrypt_stream yet; streams travel over "
                               "the cluster's authenticated connections (TLS when configured)")
        self.encrypt_stream = False
        self.retain_for_num_consumers = _int("retain_for_num_consumers",
                                             retain_for_num_consumers)
        if _int("reserve_size", reserve_size) != 0:
            raise YRValueError("yr does not support reserve_size yet; leave it 0")
        self.reserve_size = 0
        if extend_config:
            raise YRValueError("yr does not support extend_config yet, got {!r}".format(
                extend_config))
        self.extend_config = {}


class SubscriptionConfig:
    """A consumer's subscription: its name, unique per stream for ``STREAM``, shared by the
    consumers of a ``ROUND_ROBIN`` one. ``KEY_PARTITIONS`` is refused with 1001, as in
    openYuanrong."""

    def __init__(self, subscription_name="", subscription_type=SubscriptionType.STREAM,
                 extend_config=None, subscriptionType=None):
        if subscriptionType is not None:
            subscription_type = subscriptionType
        if not isinstance(subscription_name, str):
            raise YRTypeError("subscription_name must be a str, got {!r}".format(
                subscription_name))
        self.subscription_name = subscription_name
        self.subscription_type = SubscriptionType(subscription_type)
        if self.subscription_type == SubscriptionType.KEY_PARTITIONS:
            raise YRValueError("yr does not support KEY_PARTITIONS subscriptions; use STREAM "
                               "or ROUND_ROBIN")
        if extend_config:
            raise YRValueError("yr does not support extend_config yet, got {!r}".format(
                extend_config))
        self.extend_config = {}


class Producer:
    """Sends elements to one stream, in order."""

    def __init__(self, inner):
        self._inner = inner

    def send(self, element, timeout_ms=None):
        """Send ``element`` (an ``Element``, or bytes), waiting up to ``timeout_ms`` (default
        60 s) for room in the stream: 4202 if none came."""
        value = element.value if isinstance(element, Element) else Element(element).value
        timeout = DEFAULT_SEND_TIMEOUT_MS if timeout_ms is None else _int("timeout_ms",
                                                                           timeout_ms)
        self._inner.send(value, timeout)

    def close(self):
        """Flush what is buffered and close; later sends fail with 4298."""
        self._inner.close()


class Consumer:
    """Receives the elements of one subscription."""

    def __init__(self, inner):
        self._inner = inner

    def receive(self, timeout_ms, expect_num=None):
        """Up to ``expect_num`` elements (``None``: those that are ready), waiting up to
        ``timeout_ms`` for them; a timeout returns what came."""
        expect = 0 if expect_num is None else _int("expect_num", expect_num, 1)
        return [Element(value, element_id)
                for element_id, value in self._inner.receive(_int("timeout_ms", timeout_ms),
                                                             expect)]

    def ack(self, element_id):
        """Acknowledge every element up to ``element_id``: the stream may reclaim them."""
        self._inner.ack(_int("element_id", element_id, 1))

    def close(self):
        """Close the consumer (what it received counts as acked)."""
        self._inner.close()


def create_stream_producer(stream_name, config=None):
    """A producer of stream ``stream_name`` (created on first use)."""
    config = ProducerConfig() if config is None else config
    if not isinstance(config, ProducerConfig):
        raise YRTypeError("config must be a yr.ProducerConfig, got {}".format(
            type(config).__name__))
    return Producer(_yr.create_stream_producer(
        stream_name, config.delay_flush_time, config.page_size, config.max_stream_size,
        config.retain_for_num_consumers, config.auto_clean_up))


def create_stream_consumer(stream_name, config):
    """A consumer of stream ``stream_name`` in ``config``'s subscription."""
    if not isinstance(config, SubscriptionConfig):
        raise YRTypeError("config must be a yr.SubscriptionConfig, got {}".format(
            type(config).__name__))
    return Consumer(_yr.create_stream_consumer(
        stream_name, config.subscription_name,
        config.subscription_type == SubscriptionType.ROUND_ROBIN))


def delete_stream(stream_name):
    """Delete stream ``stream_name``: 4299 while it has producers or consumers."""
    _yr.delete_stream(stream_name)


def query_global_producers_num(stream_name):
    """How many producers stream ``stream_name`` has in the whole cluster."""
    return _yr.stream_counts(stream_name)[0]


def query_global_consumers_num(stream_name):
    """How many consumers stream ``stream_name`` has in the whole cluster."""
    return _yr.stream_counts(stream_name)[1]
