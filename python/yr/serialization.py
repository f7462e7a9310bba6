"""How Python values travel: pickled with cloudpickle (protocol 5), so functions, classes and
lambdas defined in ``__main__`` or a notebook cross to runtimes by value. ``yr._yr`` calls
``dumps`` while it captures the ``ObjectRef``\\ s inside the value, and ``loads`` to read one.

Large buffers (numpy arrays, and ``bytes``, ``bytearray`` and ``memoryview`` values of 64 KiB
or more) travel out of band (protocol 5): ``dumps`` gives a header, the pickle and the buffers,
which ``yr._yr`` writes one after the other straight into the object (in the node's shared
memory on a cluster), and ``loads`` hands the buffers back as read-only views of the stored
object, so a numpy array or a ``memoryview`` read by ``yr.get`` is not copied.

Layout of an object with buffers: ``b"YRP5"``, the buffer count (u32), the pickle's length and
each buffer's length (u64, little-endian), the pickle, then each buffer at a 64-byte-aligned
offset. A plain pickle starts with the PROTO opcode (``0x80 0x05``); values from other
languages (the results of Rust code, design 018) are MessagePack, which never starts with
either, and ``loads`` reads them with ``yr._yr``."""

import pickle
import struct

import cloudpickle

from yr import _yr

PROTOCOL = 5
MAGIC = b"YRP5"
OUT_OF_BAND_MIN = 64 * 1024
ALIGN = 64
PICKLE_START = b"\x80\x05"


def dumps(value):
    """The value, pickled: ``bytes``, or a list of parts when it has large buffers."""
    buffers = []

    def out_of_band(buffer):
        raw = buffer.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    if isinstance(value, (bytes, bytearray, memoryview)) and len(value) >= OUT_OF_BAND_MIN:
        value = pickle.PickleBuffer(value)
    data = cloudpickle.dumps(value, protocol=PROTOCOL, buffer_callback=out_of_band)
    if not buffers:
        return data
    lengths = [len(data)] + [raw.nbytes for raw in buffers]
    header = MAGIC + struct.pack("<I%dQ" % len(lengths), len(buffers), *lengths)
    parts = [header, data]
    position = len(header) + len(data)
    for raw in buffers:
        pad = -position % ALIGN
        if pad:
            parts.append(bytes(pad))
        parts.append(raw)
        position += pad + raw.nbytes
    return parts


def loads(data):
    """A value from its stored bytes (any bytes-like object; large buffers stay views of it)."""
    if type(data) is bytes and data.startswith(PICKLE_START):
        return pickle.loads(data)
    view = memoryview(data)
    if view[:4] != MAGIC or len(view) <= 4:
        if view[:2] != PICKLE_START:
            return _yr._unpack_msgpack(view)
        return pickle.loads(view)
    (count,) = struct.unpack_from("<I", view, 4)
    lengths = struct.unpack_from("<%dQ" % (count + 1), view, 8)
    position = 8 + 8 * (count + 1)
    pickled = view[position:position + lengths[0]]
    position += lengths[0]
    buffers = []
    for length in lengths[1:]:
        position += -position % ALIGN
        buffers.append(view[position:position + length])
        position += length
    return pickle.loads(pickled, buffers=buffers)
