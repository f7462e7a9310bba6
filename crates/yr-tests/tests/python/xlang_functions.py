"""Python code that a Rust driver calls across languages (crates/yr-tests/tests/cross_language.rs,
docs/design/018): plain functions and a class of an ordinary module, with no yr decorators."""


def echo(value):
    return value


def type_of(value):
    """The Python type a value from Rust arrived as."""
    return type(value).__name__


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)


def returns_a_set():
    return {1, 2}


NOT_A_FUNCTION = 42


class Counter:
    def __init__(self, start):
        self.value = start

    def add(self, n):
        self.value += n
        return self.value

    def get(self):
        return self.value
