"""Streams from Python: the same store and codes as the Rust SDK, local mode and a cluster."""

import threading

import pytest

import yr
from yr.exception import YRError, YRTypeError, YRValueError


@yr.invoke
def produce_in_a_task(stream, count):
    producer = yr.create_stream_producer(stream, yr.ProducerConfig(delay_flush_time=0))
    for i in range(count):
        producer.send(yr.Element(b"task-%d" % i))
    producer.close()
    return count


def test_elements_arrive_in_order_to_every_subscription(backend):
    producer = yr.create_stream_producer("py-s-order", yr.ProducerConfig(delay_flush_time=0))
    first = yr.create_stream_consumer("py-s-order", yr.SubscriptionConfig("first"))
    second = yr.create_stream_consumer("py-s-order", yr.SubscriptionConfig("second"))
    assert yr.query_global_producers_num("py-s-order") == 1
    assert yr.query_global_consumers_num("py-s-order") == 2
    for i in range(5):
        producer.send(yr.Element(b"e%d" % i))
    for consumer in (first, second):
        got = consumer.receive(timeout_ms=5000, expect_num=5)
        assert [e.value for e in got] == [b"e%d" % i for i in range(5)]
        assert [e.id for e in got] == [1, 2, 3, 4, 5]
        consumer.ack(got[-1].id)
        consumer.close()
    producer.close()
    yr.delete_stream("py-s-order")
    assert yr.query_global_consumers_num("py-s-order") == 0


def test_a_receive_times_out_with_what_is_ready(backend):
    producer = yr.create_stream_producer("py-s-timeout", yr.ProducerConfig(delay_flush_time=0))
    consumer = yr.create_stream_consumer("py-s-timeout", yr.SubscriptionConfig("only"))
    assert consumer.receive(timeout_ms=50, expect_num=1) == []
    producer.send(b"one")
    got = consumer.receive(timeout_ms=200, expect_num=2)
    assert [e.value for e in got] == [b"one"]
    consumer.close()
    producer.close()


def test_a_task_produces_and_the_driver_consumes(backend):
    consumer = yr.create_stream_consumer("py-s-task", yr.SubscriptionConfig("driver"))
    assert yr.get(produce_in_a_task.invoke("py-s-task", 3), timeout=60) == 3
    got = consumer.receive(timeout_ms=5000, expect_num=3)
    assert [e.value for e in got] == [b"task-0", b"task-1", b"task-2"]
    consumer.close()


def test_round_robin_consumers_share_the_elements(backend):
    producer = yr.create_stream_producer("py-s-rr", yr.ProducerConfig(delay_flush_time=0))
    config = yr.SubscriptionConfig("workers", yr.SubscriptionType.ROUND_ROBIN)
    a = yr.create_stream_consumer("py-s-rr", config)
    b = yr.create_stream_consumer("py-s-rr", config)
    for i in range(4):
        producer.send(b"%d" % i)
    got = a.receive(timeout_ms=5000, expect_num=2) + b.receive(timeout_ms=5000, expect_num=2)
    assert sorted(e.value for e in got) == [b"0", b"1", b"2", b"3"]
    for consumer in (a, b):
        consumer.close()
    producer.close()


def test_a_full_stream_makes_send_wait_then_fail_with_4202(backend):
    config = yr.ProducerConfig(delay_flush_time=0, page_size=4096, max_stream_size=4096)
    producer = yr.create_stream_producer("py-s-full", config)
    consumer = yr.create_stream_consumer("py-s-full", yr.SubscriptionConfig("slow"))
    producer.send(b"x" * 4096)
    with pytest.raises(YRError) as caught:
        producer.send(b"y" * 4096, timeout_ms=100)
    assert caught.value.code == 4202
    # An ack makes room for a send that waits.
    [element] = consumer.receive(timeout_ms=5000, expect_num=1)
    sender = threading.Thread(target=producer.send, args=(b"z" * 4096, 10_000))
    sender.start()
    consumer.ack(element.id)
    sender.join(timeout=30)
    assert not sender.is_alive()
    assert [e.value for e in consumer.receive(timeout_ms=5000, expect_num=1)] == [b"z" * 4096]
    consumer.close()
    producer.close()


def test_bad_names_configurations_and_deletes_are_refused(backend):
    with pytest.raises(YRValueError) as caught:
        yr.create_stream_producer("", yr.ProducerConfig())
    assert caught.value.code == 1001
    with pytest.raises(YRValueError) as caught:
        yr.create_stream_producer("py-s-bad", yr.ProducerConfig(page_size=1000))
    assert caught.value.code == 1001
    for unsupported in (dict(encrypt_stream=True), dict(reserve_size=4096),
                        dict(delay_flush_time=-1), dict(extend_config={"a": "b"})):
        with pytest.raises(YRValueError, match="does not support"):
            yr.ProducerConfig(**unsupported)
    with pytest.raises(YRValueError, match="KEY_PARTITIONS"):
        yr.SubscriptionConfig("k", yr.SubscriptionType.KEY_PARTITIONS)
    with pytest.raises(YRTypeError):
        yr.Element("not bytes")
    with pytest.raises(YRTypeError):
        yr.create_stream_consumer("py-s-bad", "not a config")
    producer = yr.create_stream_producer("py-s-busy")
    with pytest.raises(YRError) as caught:
        yr.delete_stream("py-s-busy")
    assert caught.value.code == 4299
    producer.close()
    with pytest.raises(YRError) as caught:
        producer.send(b"after close")
    assert caught.value.code == 4298
