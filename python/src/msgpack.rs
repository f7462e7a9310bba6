//! Python values as MessagePack, for calls across languages (docs/design/018): the arguments a
//! Python driver passes to Rust code and the results Python code returns to a Rust caller,
//! and back. Plain values map one to one: `None` nil, `bool`, `int` (64-bit, signed or not),
//! `float` (f64), `str`, `bytes`/`bytearray`/`memoryview` bin, `list`/`tuple` array, `dict`
//! map, and an `ObjectRef` extension type 1 (its 16-byte id), as the Rust SDK writes it, with
//! the reference captured like a pickled one. Anything else is a `YRTypeError` naming its
//! type. Encoding here, in the extension, needs no Python package beyond yr's own.
//!
//! Decoding reads a value from bytes another process wrote, so it trusts nothing: lengths are
//! checked against the bytes left, nesting is bounded, and a malformed value is 4003.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple,
};
use yr_common::{Error, ErrorCode};
use yr_runtime::object_store::{ObjectHandle, Payload, StoredValue};
use yr_runtime::shared_memory::{self, EncodeError, Encoded};

use crate::values::ObjectRef;

/// How deep values may nest (a list that contains itself must not exhaust the stack).
const MAX_DEPTH: usize = 256;

/// MessagePack extension type of an object reference, as the Rust SDK writes it.
const OBJECT_REF: i8 = 1;

/// Whether `bytes` are a pickle (protocol 5, or yr's out-of-band layout) rather than
/// MessagePack. A MessagePack value never starts so: `0x80` alone is an empty map, and `Y`
/// (`0x59`) alone the number 89.
pub fn is_pickle(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x80, 0x05]) || (bytes.len() > 4 && bytes.starts_with(b"YRP5"))
}

fn type_error(py: Python<'_>, message: String) -> PyErr {
    match py
        .import("yr.exception")
        .and_then(|module| module.getattr("YRTypeError"))
        .and_then(|class| class.call1((message.clone(),)))
    {
        Ok(exception) => PyErr::from_value(exception),
        Err(_) => PyTypeError::new_err(message),
    }
}

fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Encode `value` as a value of the core: MessagePack with the references inside captured,
/// in the node's shared memory when it is large. `what` names the value in errors ("argument
/// 2 of worker::add").
pub fn pack(value: &Bound<'_, PyAny>, what: &str) -> PyResult<StoredValue> {
    let py = value.py();
    let mut bytes = Vec::new();
    let mut nested = Vec::new();
    Encoder {
        out: &mut bytes,
        nested: &mut nested,
        what,
    }
    .encode(value, 0)?;
    let write = || {
        shared_memory::write_encoded(|writer| {
            writer
                .write_all(&bytes)
                .map_err(|e| format!("writing {} bytes: {e}", bytes.len()))
        })
    };
    let encoded = if bytes.len() > shared_memory::INLINE_LIMIT {
        py.allow_threads(write)
    } else {
        write()
    };
    let bytes = match encoded {
        Ok(Encoded::Inline(bytes)) => Payload::Inline(bytes),
        Ok(Encoded::Shared(region)) => Payload::Shared(region),
        Err(EncodeError::Store(error)) => return Err(crate::errors::to_py(py, &error, "")),
        Err(EncodeError::Encode(message)) => {
            return Err(crate::errors::to_py(
                py,
                &Error::new(ErrorCode::ParamInvalid, message),
                "",
            ))
        }
    };
    Ok(StoredValue { bytes, nested })
}

struct Encoder<'a> {
    out: &'a mut Vec<u8>,
    nested: &'a mut Vec<ObjectHandle>,
    what: &'a str,
}

/// The error of a value (`what`) that cannot cross.
fn refused(what: &str, value: &Bound<'_, PyAny>, why: &str) -> PyErr {
    type_error(
        value.py(),
        format!(
            "{what} cannot cross to another language: {why}; pass None, bool, int, float, str, \
             bytes, list, tuple, dict or ObjectRef values"
        ),
    )
}

/// A write into the encoding (into a `Vec`, which cannot fail; checked all the same).
fn checked<T, E: std::fmt::Display>(
    what: &str,
    value: &Bound<'_, PyAny>,
    written: Result<T, E>,
) -> PyResult<()> {
    written
        .map(|_| ())
        .map_err(|e| refused(what, value, &format!("encoding failed: {e}")))
}

impl Encoder<'_> {
    fn refuse(&self, value: &Bound<'_, PyAny>, why: &str) -> PyErr {
        refused(self.what, value, why)
    }

    fn length(&self, value: &Bound<'_, PyAny>, len: usize) -> PyResult<u32> {
        u32::try_from(len).map_err(|_| self.refuse(value, "it has more than 2^32 - 1 items"))
    }

    fn encode(&mut self, value: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
        if depth > MAX_DEPTH {
            return Err(self.refuse(value, &format!("it nests deeper than {MAX_DEPTH} levels")));
        }
        let what = self.what;
        let out = &mut *self.out;
        if value.is_none() {
            return checked(what, value, rmp::encode::write_nil(out));
        }
        if let Ok(flag) = value.downcast::<PyBool>() {
            return checked(what, value, rmp::encode::write_bool(out, flag.is_true()));
        }
        if let Ok(number) = value.downcast::<PyInt>() {
            return self.integer(number.as_any());
        }
        if let Ok(number) = value.downcast::<PyFloat>() {
            return checked(what, value, rmp::encode::write_f64(out, number.value()));
        }
        if let Ok(text) = value.downcast::<PyString>() {
            let text = text
                .to_str()
                .map_err(|_| self.refuse(value, "the string is not valid UTF-8"))?;
            self.length(value, text.len())?;
            return checked(what, value, rmp::encode::write_str(self.out, text));
        }
        if let Ok(bytes) = value.downcast::<PyBytes>() {
            return self.bin(value, bytes.as_bytes());
        }
        if let Ok(bytes) = value.downcast::<PyByteArray>() {
            return self.bin(value, &bytes.to_vec());
        }
        if let Ok(reference) = value.downcast::<ObjectRef>() {
            let handle = reference.get().handle.clone();
            let id = handle.id().to_bytes();
            self.nested.push(handle);
            checked(
                what,
                value,
                rmp::encode::write_ext_meta(self.out, 16, OBJECT_REF),
            )?;
            self.out.extend_from_slice(&id);
            return Ok(());
        }
        if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
            let len = self.length(value, value.len()?)?;
            checked(what, value, rmp::encode::write_array_len(self.out, len))?;
            for item in value.try_iter()? {
                self.encode(&item?, depth + 1)?;
            }
            return Ok(());
        }
        if let Ok(map) = value.downcast::<PyDict>() {
            let len = self.length(value, map.len())?;
            checked(what, value, rmp::encode::write_map_len(self.out, len))?;
            for (key, item) in map.iter() {
                self.encode(&key, depth + 1)?;
                self.encode(&item, depth + 1)?;
            }
            return Ok(());
        }
        // A buffer (memoryview, numpy array of bytes, …): its bytes.
        if let Ok(buffer) = pyo3::buffer::PyBuffer::<u8>::get(value) {
            let bytes = buffer.to_vec(value.py())?;
            return self.bin(value, &bytes);
        }
        // An integer of another library (numpy.int64) that says it is one.
        if value.hasattr("__index__")? {
            let number = value.call_method0("__index__")?;
            return self.integer(&number);
        }
        Err(self.refuse(
            value,
            &format!("a {} is not a plain value", type_name(value)),
        ))
    }

    fn integer(&mut self, number: &Bound<'_, PyAny>) -> PyResult<()> {
        if let Ok(signed) = number.extract::<i64>() {
            return checked(self.what, number, rmp::encode::write_sint(self.out, signed));
        }
        if let Ok(unsigned) = number.extract::<u64>() {
            return checked(
                self.what,
                number,
                rmp::encode::write_uint(self.out, unsigned),
            );
        }
        Err(self.refuse(
            number,
            &format!("the integer {number} does not fit in 64 bits"),
        ))
    }

    fn bin(&mut self, value: &Bound<'_, PyAny>, bytes: &[u8]) -> PyResult<()> {
        self.length(value, bytes.len())?;
        checked(self.what, value, rmp::encode::write_bin(self.out, bytes))
    }
}

/// The error of bytes that are not a MessagePack value yr can read (4003).
fn malformed(why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorCode::DeserializationFailed,
        format!(
            "cannot read a value from another language: {why}; values across languages are \
             MessagePack of plain types (numbers, strings, bytes, lists, maps)"
        ),
    )
}

/// Decode one MessagePack value (all of `bytes`) as a Python value. 4003 if it is not one.
pub fn unpack<'py>(py: Python<'py>, bytes: &[u8]) -> Result<Bound<'py, PyAny>, Error> {
    let mut decoder = Decoder { py, bytes, at: 0 };
    let value = decoder.value(0, false)?;
    if decoder.at != bytes.len() {
        return Err(malformed(format!(
            "{} bytes follow the value's {}",
            bytes.len() - decoder.at,
            decoder.at
        )));
    }
    Ok(value)
}

struct Decoder<'py, 'b> {
    py: Python<'py>,
    bytes: &'b [u8],
    at: usize,
}

impl<'py, 'b> Decoder<'py, 'b> {
    fn take(&mut self, len: usize) -> Result<&'b [u8], Error> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                malformed(format!(
                    "the value ends after {} bytes, inside an item of {len}",
                    self.bytes.len()
                ))
            })?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn number<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// The length that follows a marker of an 8-, 16- or 32-bit length.
    fn length(&mut self, marker: rmp::Marker) -> Result<usize, Error> {
        use rmp::Marker as M;
        match marker {
            M::Str8 | M::Bin8 | M::Ext8 => Ok(usize::from(self.number::<1>()?[0])),
            M::Str16 | M::Bin16 | M::Ext16 | M::Array16 | M::Map16 => {
                Ok(usize::from(u16::from_be_bytes(self.number()?)))
            }
            _ => usize::try_from(u32::from_be_bytes(self.number()?)).map_err(malformed),
        }
    }

    fn py_err(&self, error: PyErr) -> Error {
        malformed(error.value(self.py).to_string())
    }

    fn value(&mut self, depth: usize, as_key: bool) -> Result<Bound<'py, PyAny>, Error> {
        use rmp::Marker as M;
        if depth > MAX_DEPTH {
            return Err(malformed(format!(
                "values nest deeper than {MAX_DEPTH} levels"
            )));
        }
        let py = self.py;
        let marker = M::from_u8(self.number::<1>()?[0]);
        match marker {
            M::Null => Ok(py.None().into_bound(py)),
            M::True => Ok(PyBool::new(py, true).to_owned().into_any()),
            M::False => Ok(PyBool::new(py, false).to_owned().into_any()),
            M::FixPos(n) => Ok(PyInt::new(py, u64::from(n)).into_any()),
            M::FixNeg(n) => Ok(PyInt::new(py, i64::from(n)).into_any()),
            M::U8 => Ok(PyInt::new(py, u64::from(self.number::<1>()?[0])).into_any()),
            M::U16 => Ok(PyInt::new(py, u64::from(u16::from_be_bytes(self.number()?))).into_any()),
            M::U32 => Ok(PyInt::new(py, u64::from(u32::from_be_bytes(self.number()?))).into_any()),
            M::U64 => Ok(PyInt::new(py, u64::from_be_bytes(self.number()?)).into_any()),
            M::I8 => Ok(PyInt::new(py, i64::from(i8::from_be_bytes(self.number()?))).into_any()),
            M::I16 => Ok(PyInt::new(py, i64::from(i16::from_be_bytes(self.number()?))).into_any()),
            M::I32 => Ok(PyInt::new(py, i64::from(i32::from_be_bytes(self.number()?))).into_any()),
            M::I64 => Ok(PyInt::new(py, i64::from_be_bytes(self.number()?)).into_any()),
            M::F32 => {
                Ok(PyFloat::new(py, f64::from(f32::from_be_bytes(self.number()?))).into_any())
            }
            M::F64 => Ok(PyFloat::new(py, f64::from_be_bytes(self.number()?)).into_any()),
            M::FixStr(len) => self.string(usize::from(len)),
            M::Str8 | M::Str16 | M::Str32 => {
                let len = self.length(marker)?;
                self.string(len)
            }
            M::Bin8 | M::Bin16 | M::Bin32 => {
                let len = self.length(marker)?;
                Ok(PyBytes::new(py, self.take(len)?).into_any())
            }
            M::FixArray(len) => self.array(usize::from(len), depth, as_key),
            M::Array16 | M::Array32 => {
                let len = self.length(marker)?;
                self.array(len, depth, as_key)
            }
            M::FixMap(len) => self.map(usize::from(len), depth),
            M::Map16 | M::Map32 => {
                let len = self.length(marker)?;
                self.map(len, depth)
            }
            M::FixExt1 => self.ext(1),
            M::FixExt2 => self.ext(2),
            M::FixExt4 => self.ext(4),
            M::FixExt8 => self.ext(8),
            M::FixExt16 => self.ext(16),
            M::Ext8 | M::Ext16 | M::Ext32 => {
                let len = self.length(marker)?;
                self.ext(len)
            }
            M::Reserved => Err(malformed("byte 0xc1 is not a MessagePack value")),
        }
    }

    fn string(&mut self, len: usize) -> Result<Bound<'py, PyAny>, Error> {
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(malformed)?;
        Ok(PyString::new(self.py, text).into_any())
    }

    fn array(
        &mut self,
        len: usize,
        depth: usize,
        as_key: bool,
    ) -> Result<Bound<'py, PyAny>, Error> {
        // Every item takes a byte at least: a length beyond the bytes left is malformed, and
        // nothing is allocated for it.
        if len > self.bytes.len() - self.at {
            return Err(malformed(format!(
                "an array of {len} items in {} bytes",
                self.bytes.len()
            )));
        }
        let list = PyList::empty(self.py);
        for _ in 0..len {
            let item = self.value(depth + 1, as_key)?;
            list.append(item).map_err(|e| self.py_err(e))?;
        }
        // A list is not hashable: as a map's key it becomes a tuple.
        if as_key {
            return Ok(PyTuple::new(self.py, list.iter())
                .map_err(|e| self.py_err(e))?
                .into_any());
        }
        Ok(list.into_any())
    }

    fn map(&mut self, len: usize, depth: usize) -> Result<Bound<'py, PyAny>, Error> {
        if len > (self.bytes.len() - self.at) / 2 {
            return Err(malformed(format!(
                "a map of {len} entries in {} bytes",
                self.bytes.len()
            )));
        }
        let dict = PyDict::new(self.py);
        for _ in 0..len {
            let key = self.value(depth + 1, true)?;
            let item = self.value(depth + 1, false)?;
            dict.set_item(key, item).map_err(|e| self.py_err(e))?;
        }
        Ok(dict.into_any())
    }

    fn ext(&mut self, len: usize) -> Result<Bound<'py, PyAny>, Error> {
        let kind = i8::from_be_bytes(self.number()?);
        let data = self.take(len)?;
        if kind != OBJECT_REF {
            return Err(malformed(format!(
                "MessagePack extension type {kind} is not one yr reads (1: an object reference)"
            )));
        }
        let reference = crate::values::ref_by_id(data).map_err(|e| self.py_err(e))?;
        Bound::new(self.py, reference)
            .map(Bound::into_any)
            .map_err(|e| self.py_err(e))
    }
}

/// The Python value of MessagePack `data` (any bytes-like object): how `yr.serialization`
/// reads a value that is not a pickle, such as a Rust function's result.
#[pyfunction]
#[pyo3(name = "_unpack_msgpack")]
pub fn unpack_msgpack<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let buffer = pyo3::buffer::PyBuffer::<u8>::get(data)?;
    let bytes = buffer.to_vec(py)?;
    unpack(py, &bytes).map_err(|error| crate::errors::to_py(py, &error, "failed to get object"))
}

/// The MessagePack encoding of `value` (tests and tools: what Rust code receives).
#[pyfunction]
#[pyo3(name = "_pack_msgpack")]
pub fn pack_msgpack<'py>(
    py: Python<'py>,
    value: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut bytes = Vec::new();
    let mut nested = Vec::new();
    Encoder {
        out: &mut bytes,
        nested: &mut nested,
        what: "the value",
    }
    .encode(value, 0)?;
    Ok(PyBytes::new(py, &bytes))
}
