"""Calls from Python to Rust (docs/design/018): the Rust program is the example
``cross_language`` (crates/yr/examples/cross_language.rs), built by cargo, which the node runs
as the runtime. Values cross as MessagePack in both directions; a wrong name is 1015."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

import yr
from yr import serialization
from yr.exception import YRError, YRTypeError, YRValueError

from conftest import REPO, yr_binary


def rust_example():
    """The example program: ``$YR_RUST_EXAMPLE``, else beside the ``yr`` binary the tests use
    (``<profile>/examples/``), else in this repository's target directory."""
    explicit = os.environ.get("YR_RUST_EXAMPLE")
    if explicit:
        return explicit
    candidates = [Path(yr_binary()).resolve().parent / "examples" / "cross_language"]
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    candidates += [target / profile / "examples" / "cross_language"
                   for profile in ("debug", "release")]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    pytest.fail("no cross_language example: build it (cargo build -p yr --examples) and set "
                "YR_RUST_EXAMPLE")


@pytest.fixture
def exe(backend):
    if backend != "cluster":
        pytest.skip("only a cluster runs another executable (local mode is 4006, tested apart)")
    return rust_example()


def rust(exe, name, **kwargs):
    return yr.rust_function("cross_language::" + name, executable=exe, **kwargs)


def test_a_rust_function_adds(exe):
    assert yr.get(rust(exe, "add").invoke(1, 2), timeout=60) == 3


ROUND_TRIPS = [
    ("echo_int", 0), ("echo_int", -5), ("echo_int", 2**63 - 1), ("echo_int", -2**63),
    ("echo_unsigned", 2**64 - 1),
    ("echo_float", 1.5), ("echo_float", -2.25e300), ("echo_float", float("inf")),
    ("echo_bool", True), ("echo_bool", False),
    ("echo_string", ""), ("echo_string", "héllo, 世界"),
    ("echo_bytes", b""), ("echo_bytes", bytes(range(256))),
    ("echo_list", []), ("echo_list", [1, -2, 3]),
    ("echo_map", {}), ("echo_map", {"a": ["x", "y"], "b": []}),
    ("echo_optional", None), ("echo_optional", 7),
]


@pytest.mark.parametrize("function,value", ROUND_TRIPS,
                         ids=["{}-{}".format(f, i) for i, (f, _) in enumerate(ROUND_TRIPS)])
def test_each_plain_value_round_trips_through_rust(exe, function, value):
    back = yr.get(rust(exe, function).invoke(value), timeout=60)
    assert back == value
    assert type(back) is type(value)


def test_a_tuple_arrives_as_a_list_and_a_struct_as_a_dict(exe):
    assert yr.get(rust(exe, "echo_list").invoke((4, 5)), timeout=60) == [4, 5]
    mirrored = yr.get(rust(exe, "mirror").invoke({"x": 1.0, "y": 2.5}), timeout=60)
    assert mirrored == {"x": 2.5, "y": 1.0}


def test_large_bytes_cross_through_shared_memory(exe):
    big = os.urandom(3 << 20)
    back = yr.get(rust(exe, "echo_bytes").invoke(big), timeout=60)
    assert bytes(back) == big


def test_a_rust_function_with_two_results(exe):
    words, count = rust(exe, "split_words", return_nums=2).invoke("the quick brown fox")
    assert yr.get([words, count], timeout=60) == [["the", "quick", "brown", "fox"], 4]


def test_options_apply_to_rust_calls(exe):
    add = rust(exe, "add").options(cpu=600, memory=256)
    assert yr.get(add.invoke(20, 22), timeout=60) == 42


def test_a_rust_instance_keeps_its_state(exe):
    Counter = yr.rust_instance_class("cross_language::Counter", executable=exe)
    assert Counter.get_factory_name() == "cross_language::Counter::new"
    counter = Counter.invoke(10)
    assert yr.get(counter.add.invoke(5), timeout=60) == 15
    assert yr.get(counter.add.invoke(1), timeout=60) == 16
    assert yr.get(counter.get.invoke(), timeout=60) == 16
    counter.terminate(is_sync=True)


def test_a_named_rust_instance_is_found_by_its_name(exe):
    Counter = yr.rust_instance_class("cross_language::Counter", executable=exe)
    named = Counter.options(name="rust-counter", namespace="xlang").invoke(3)
    found = Counter.get_instance("rust-counter", "xlang", timeout=60)
    assert found.instance_id == named.instance_id
    assert yr.get(found.add.invoke(4), timeout=60) == 7
    named.terminate(is_sync=True)


def test_a_rust_result_is_passed_by_reference_to_rust_and_python(exe):
    add = rust(exe, "add")
    three = add.invoke(1, 2)
    assert yr.get(add.invoke(three, 10), timeout=60) == 13

    @yr.invoke
    def double(value):
        return value * 2

    assert yr.get(double.invoke(three), timeout=60) == 6


def assert_error(raised, code, *needles):
    assert raised.code == code, raised
    for needle in needles:
        assert needle in str(raised), raised


def test_a_wrong_function_name_is_1015_naming_it(exe):
    with pytest.raises(YRError) as caught:
        yr.get(rust(exe, "no_such_function").invoke(1), timeout=60)
    assert_error(caught.value, 1015, "cross_language::no_such_function")


def test_a_wrong_class_or_method_name_is_1015_naming_it(exe):
    Nobody = yr.rust_instance_class("cross_language::Nobody", executable=exe)
    nobody = Nobody.invoke()
    with pytest.raises(YRError) as caught:
        yr.get(nobody.get.invoke(), timeout=60)
    assert_error(caught.value, 1015, "cross_language::Nobody::new")

    counter = yr.rust_instance_class("cross_language::Counter", executable=exe).invoke(0)
    with pytest.raises(YRError) as caught:
        yr.get(counter.reset.invoke(), timeout=60)
    assert_error(caught.value, 1015, "cross_language::Counter::reset")
    counter.terminate()


def test_a_rust_error_is_2002_with_its_message(exe):
    with pytest.raises(YRError) as caught:
        yr.get(rust(exe, "divide").invoke(1, 0), timeout=60)
    assert_error(caught.value, 2002, "cannot divide 1 by zero")


def test_a_value_of_the_wrong_type_is_4003(exe):
    with pytest.raises(YRError) as caught:
        yr.get(rust(exe, "echo_int").invoke("not a number"), timeout=60)
    assert_error(caught.value, 4003, "i64")


def test_values_that_cannot_cross_are_type_errors(exe):
    add = rust(exe, "add")
    with pytest.raises(YRTypeError, match="argument 0 of cross_language::add"):
        add.invoke(object(), 1)
    with pytest.raises(YRTypeError, match="64 bits"):
        add.invoke(2**70, 1)
    with pytest.raises(YRTypeError, match="positional"):
        add.invoke(a=1, b=2)


def test_the_node_refuses_executables_others_can_change_and_paths_that_name_none(exe):
    directory = tempfile.mkdtemp()
    try:
        script = os.path.join(directory, "worker")
        with open(script, "w") as source:
            source.write("#!/bin/sh\nexit 0\n")
        os.chmod(script, 0o775)
        with pytest.raises(YRError) as caught:
            yr.rust_function("worker::add", executable=script).invoke(1)
        assert_error(caught.value, 1014, script, "its group")
        with pytest.raises(YRValueError) as caught:
            yr.rust_function("worker::add", executable=os.path.join(directory, "none")).invoke(1)
        assert_error(caught.value, 1001, "none")
    finally:
        shutil.rmtree(directory)


def test_a_rust_function_needs_an_executable(backend):
    os.environ.pop("YR_RUST_EXECUTABLE", None)
    with pytest.raises(YRValueError, match="executable"):
        yr.rust_function("cross_language::add")


def test_calls_to_rust_in_local_mode_are_4006(backend):
    if backend != "local":
        pytest.skip("the cluster runs them")
    with pytest.raises(YRError) as caught:
        yr.rust_function("cross_language::add", executable="/bin/true").invoke(1, 2)
    assert_error(caught.value, 4006, "local mode", "cross_language::add")
    with pytest.raises(YRError) as caught:
        yr.rust_instance_class("cross_language::Counter", executable="/bin/true").invoke(0)
    assert_error(caught.value, 4006, "local mode", "cross_language::Counter")


def test_messagepack_values_read_back_as_they_were_written():
    value = {"n": [1, -1, 2**64 - 1, 1.5, None, True], "s": "é", "b": b"\x00", (1, 2): []}
    packed = yr._yr._pack_msgpack(value)
    assert packed[:1] != b"\x80"
    assert yr._yr._unpack_msgpack(packed) == value
    assert serialization.loads(packed) == value
    with pytest.raises(YRError) as caught:
        yr._yr._unpack_msgpack(b"\x92\x01")
    assert caught.value.code == 4003
    with pytest.raises(YRError) as caught:
        yr._yr._unpack_msgpack(b"\xdd\xff\xff\xff\xff")
    assert caught.value.code == 4003
