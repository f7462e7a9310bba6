//! Python values as the core's values. A value is its pickle (protocol 5, by
//! `yr.serialization`), and every `ObjectRef` pickled inside it is captured while pickling, so
//! the value keeps those objects alive and a call waits for them, as the core does for
//! MessagePack values. A reference unpickles by its id, through the object store's index.

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyBytes, PyFloat, PyInt, PyList, PyString, PyTuple};
use yr_common::ids::ObjectId;
use yr_runtime::object_store::{ObjectHandle, ObjectSlot, Payload, StoredValue};
use yr_runtime::shared_memory::{self, EncodeError, Encoded, INLINE_LIMIT};

thread_local! {
    static CAPTURE: RefCell<Option<Vec<ObjectHandle>>> = const { RefCell::new(None) };
}

/// A reference to an object: the result of a call or of `yr.put`.
#[pyclass(module = "yr._yr", name = "ObjectRef", frozen, weakref)]
pub struct ObjectRef {
    pub handle: ObjectHandle,
}

impl ObjectRef {
    pub fn new(handle: ObjectHandle) -> ObjectRef {
        ObjectRef { handle }
    }
}

#[pymethods]
impl ObjectRef {
    /// The object's id (32 hex digits).
    #[getter]
    fn id(&self) -> String {
        self.handle.id().to_string()
    }

    /// Whether the object is finished (with a value or an error).
    fn done(&self) -> bool {
        self.handle.is_finished()
    }

    /// The object's value, waiting at most `timeout` seconds (-1: forever); as `yr.get`.
    #[pyo3(signature = (timeout = 300.0))]
    fn get(slf: &Bound<'_, Self>, timeout: f64) -> PyResult<PyObject> {
        let py = slf.py();
        Ok(py
            .import("yr")?
            .getattr("get")?
            .call1((slf, timeout))?
            .unbind())
    }

    /// Call `callback()` once the object is finished (at once if it is), on yr's callback
    /// thread, which holds the GIL only to run callbacks: the thread that finishes the object
    /// never waits for the GIL.
    fn _on_finished(&self, callback: PyObject) {
        let sender = crate::callbacks::sender();
        self.handle.on_finished(Box::new(move || {
            let _ = sender.send(callback);
        }));
    }

    /// A `concurrent.futures.Future` of the object's value (or its exception).
    fn as_future(slf: &Bound<'_, Self>) -> PyResult<PyObject> {
        Ok(futures(slf.py(), "as_future")?.call1((slf,))?.unbind())
    }

    /// Call `callback(ref)` once the object is finished.
    fn on_complete(slf: &Bound<'_, Self>, callback: PyObject) -> PyResult<()> {
        futures(slf.py(), "on_complete")?.call1((slf, callback))?;
        Ok(())
    }

    /// `await ref` in asyncio gives the object's value.
    fn __await__(slf: &Bound<'_, Self>) -> PyResult<PyObject> {
        let awaitable = futures(slf.py(), "awaitable")?.call1((slf,))?;
        Ok(awaitable.call_method0("__await__")?.unbind())
    }

    /// Pickles as its id; inside a value being packed, the reference is captured.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let handle = &slf.get().handle;
        CAPTURE.with(|capture| {
            if let Some(list) = capture.borrow_mut().as_mut() {
                list.push(handle.clone());
            }
        });
        let rebuild = py.import("yr._yr")?.getattr("_ref_by_id")?;
        let id = PyBytes::new(py, &handle.id().to_bytes());
        (rebuild, (id,)).into_pyobject(py)
    }

    fn __repr__(&self) -> String {
        format!("ObjectRef({})", self.handle.id())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .downcast::<ObjectRef>()
            .is_ok_and(|other| other.get().handle.id() == self.handle.id())
    }

    fn __hash__(&self) -> u64 {
        let bytes = self.handle.id().to_bytes();
        u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default())
    }
}

/// A function of `yr._futures`, which builds futures and callbacks on `_on_finished`.
fn futures<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("yr._futures")?.getattr(name)
}

/// The reference with this id, as a value being unpickled names it: the object store finds the
/// slot that the value (or the call carrying it) keeps alive.
#[pyfunction]
#[pyo3(name = "_ref_by_id")]
pub fn ref_by_id(id: &[u8]) -> PyResult<ObjectRef> {
    let id: [u8; 16] = id.try_into().map_err(|_| {
        PyValueError::new_err(format!("an object id has 16 bytes, got {}", id.len()))
    })?;
    let id = ObjectId::from_bytes(id);
    let handle = ObjectSlot::lookup(id).unwrap_or_else(|| ObjectSlot::missing(id));
    Ok(ObjectRef::new(handle))
}

/// `module.name` (a function, or a constant), looked up once and kept in `cell`.
pub(crate) fn module_attribute<'py>(
    py: Python<'py>,
    cell: &'static GILOnceCell<PyObject>,
    module: &str,
    name: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    Ok(cell
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import(module)?.getattr(name)?.unbind())
        })?
        .bind(py))
}

/// Whether `value` pickles the same with the standard pickler as with cloudpickle, with no
/// reference and no out-of-band buffer inside: `None`, and exact `bool`, `int`, `float`, `str`,
/// and `bytes` below `yr.serialization.OUT_OF_BAND_MIN`. Those skip cloudpickle (a new
/// pickler per value, several times the cost of a small call's own work).
fn is_plain(value: &Bound<'_, PyAny>) -> PyResult<bool> {
    static OUT_OF_BAND_MIN: GILOnceCell<usize> = GILOnceCell::new();
    if value.is_none()
        || value.is_exact_instance_of::<PyInt>()
        || value.is_exact_instance_of::<PyBool>()
        || value.is_exact_instance_of::<PyFloat>()
        || value.is_exact_instance_of::<PyString>()
    {
        return Ok(true);
    }
    let Ok(bytes) = value.downcast_exact::<PyBytes>() else {
        return Ok(false);
    };
    let py = value.py();
    let limit = OUT_OF_BAND_MIN.get_or_try_init(py, || {
        static ATTRIBUTE: GILOnceCell<PyObject> = GILOnceCell::new();
        module_attribute(py, &ATTRIBUTE, "yr.serialization", "OUT_OF_BAND_MIN")?.extract()
    })?;
    Ok(bytes.as_bytes().len() < *limit)
}

/// Pickle `value`, capturing the references inside it. `yr.serialization.dumps` gives the
/// pickle, or a list of parts (a header, the pickle and its out-of-band buffers) that are
/// written one after the other, straight from the objects' memory; a plain value
/// ([`is_plain`]) is pickled by `pickle.dumps`. An encoding above the inline limit goes to the
/// node's shared memory when this process has one, written without the GIL.
pub fn pack(value: &Bound<'_, PyAny>) -> PyResult<StoredValue> {
    static DUMPS: GILOnceCell<PyObject> = GILOnceCell::new();
    static CLOUD_DUMPS: GILOnceCell<PyObject> = GILOnceCell::new();
    let py = value.py();
    let (pickled, nested) = if is_plain(value)? {
        let dumps = module_attribute(py, &DUMPS, "pickle", "dumps")?;
        (dumps.call1((value, PROTOCOL))?, Vec::new())
    } else {
        let outer = CAPTURE.with(|capture| capture.borrow_mut().replace(Vec::new()));
        let pickled =
            module_attribute(py, &CLOUD_DUMPS, "yr.serialization", "dumps")?.call1((value,));
        let nested = CAPTURE
            .with(|capture| std::mem::replace(&mut *capture.borrow_mut(), outer))
            .unwrap_or_default();
        (pickled?, nested)
    };
    if let Ok(bytes) = pickled.downcast::<PyBytes>() {
        let bytes = bytes.as_bytes();
        if bytes.len() <= INLINE_LIMIT {
            return Ok(StoredValue {
                bytes: Payload::Inline(bytes.to_vec()),
                nested,
            });
        }
    }
    let parts: Vec<Bound<'_, PyAny>> = match pickled.downcast::<PyList>() {
        Ok(list) => list.iter().collect(),
        Err(_) => vec![pickled],
    };
    let buffers = parts
        .iter()
        .map(|part| {
            let buffer = PyBuffer::<u8>::get(part)?;
            if !buffer.is_c_contiguous() {
                return Err(PyBufferError::new_err(
                    "a pickled buffer is not contiguous; pass contiguous data",
                ));
            }
            Ok(buffer)
        })
        .collect::<PyResult<Vec<_>>>()?;
    // (address, length) of each part: plain numbers cross into the GIL-free copy.
    let spans: Vec<(usize, usize)> = buffers
        .iter()
        .map(|b| (b.buf_ptr() as usize, b.len_bytes()))
        .collect();
    let total: usize = spans.iter().map(|(_, len)| len).sum();
    let write = || {
        shared_memory::write_encoded(|writer| {
            for &(address, len) in &spans {
                // SAFETY: each span is the memory of a contiguous buffer in `buffers`, which
                // holds it (and its exporter) until after this copy; it is only read.
                let part = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
                writer
                    .write_all(part)
                    .map_err(|e| format!("writing {total} bytes: {e}"))?;
            }
            Ok::<(), String>(())
        })
    };
    let encoded = if total > shared_memory::INLINE_LIMIT {
        py.allow_threads(write)
    } else {
        write()
    };
    drop(buffers);
    let bytes = match encoded {
        Ok(Encoded::Inline(bytes)) => Payload::Inline(bytes),
        Ok(Encoded::Shared(region)) => Payload::Shared(region),
        Err(EncodeError::Store(error)) => return Err(crate::errors::to_py(py, &error, "")),
        Err(EncodeError::Encode(message)) => {
            return Err(PyValueError::new_err(format!(
                "cannot store a pickled value: {message}"
            )))
        }
    };
    Ok(StoredValue { bytes, nested })
}

/// Values up to this size are copied into `bytes` to be read; larger ones are read in place.
const COPY_LIMIT: usize = 64 * 1024;
/// The pickle protocol of every value (`yr.serialization.PROTOCOL`).
const PROTOCOL: u8 = 5;
/// The first byte of a pickle of protocol 2 or later (the PROTO opcode).
const PICKLE_PROTO: u8 = 0x80;

/// The encoded bytes of a stored value for Python: a copy if small, else a read-only view of
/// the value in place (`SharedBytes`).
pub fn encoded<'py>(py: Python<'py>, value: &Arc<StoredValue>) -> PyResult<Bound<'py, PyAny>> {
    if value.bytes.len() <= COPY_LIMIT {
        return Ok(PyBytes::new(py, &value.bytes).into_any());
    }
    Ok(Bound::new(
        py,
        SharedBytes {
            value: value.clone(),
        },
    )?
    .into_any())
}

/// Unpickle a stored value. References inside resolve through the object store (the value,
/// which holds them, is alive); large buffers inside stay in place: the objects made from them
/// (`memoryview`, numpy arrays) read the stored value, which lives as long as they do.
pub fn unpack<'py>(py: Python<'py>, value: &Arc<StoredValue>) -> PyResult<Bound<'py, PyAny>> {
    static LOADS: GILOnceCell<PyObject> = GILOnceCell::new();
    static YR_LOADS: GILOnceCell<PyObject> = GILOnceCell::new();
    let bytes: &[u8] = &value.bytes;
    // A small plain pickle (it starts with the PROTO opcode and protocol 5; the layout with
    // out-of-band buffers starts with `YRP5`, MessagePack from another language with anything
    // else) goes straight to `pickle.loads`.
    if bytes.len() <= COPY_LIMIT && bytes.starts_with(&[PICKLE_PROTO, PROTOCOL]) {
        let loads = module_attribute(py, &LOADS, "pickle", "loads")?;
        return loads.call1((PyBytes::new(py, bytes),));
    }
    module_attribute(py, &YR_LOADS, "yr.serialization", "loads")?.call1((encoded(py, value)?,))
}

/// A value pickled once and passed as an argument of many calls (a call's descriptor): its
/// bytes and references are copied into each call, with no pickling.
#[pyclass(module = "yr._yr", name = "PreparedValue", frozen)]
pub struct PreparedValue {
    bytes: Vec<u8>,
    nested: Vec<ObjectHandle>,
}

impl PreparedValue {
    /// The value for one more call.
    pub fn value(&self) -> StoredValue {
        StoredValue {
            bytes: Payload::Inline(self.bytes.clone()),
            nested: self.nested.clone(),
        }
    }
}

/// `value` pickled once, for many calls: a `PreparedValue`, or `value` itself when its pickle
/// is too large to travel inline (it is then pickled with each call).
#[pyfunction]
pub fn prepare<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let packed = pack(value)?;
    match packed.bytes {
        Payload::Inline(bytes) => Ok(Bound::new(
            value.py(),
            PreparedValue {
                bytes,
                nested: packed.nested,
            },
        )?
        .into_any()),
        _ => Ok(value.clone()),
    }
}

/// A stored value's bytes, read in place through the buffer protocol (read-only). Views of it
/// keep the value, and so its shared-memory range, alive.
#[pyclass(module = "yr._yr", name = "SharedBytes", frozen)]
pub struct SharedBytes {
    value: Arc<StoredValue>,
}

#[pymethods]
impl SharedBytes {
    fn __len__(&self) -> usize {
        self.value.bytes.len()
    }

    /// # Safety
    /// Called by Python with a valid `view`; fills it to describe the value's bytes, which do
    /// not move or change while `view.obj` (this object) holds the value.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("no view to fill"));
        }
        if flags & pyo3::ffi::PyBUF_WRITABLE == pyo3::ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "a yr object is read-only; copy it to change it",
            ));
        }
        let bytes: &[u8] = &slf.get().value.bytes;
        // SAFETY: `view` is valid (checked non-null; Python passes a writable struct); the
        // pointers stored in it (the bytes, `len`, `itemsize`, the format literal) outlive the
        // view, which holds a reference to this object.
        unsafe {
            (*view).buf = bytes.as_ptr() as *mut c_void;
            (*view).len = bytes.len() as isize;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & pyo3::ffi::PyBUF_FORMAT == pyo3::ffi::PyBUF_FORMAT {
                c"B".as_ptr() as *mut _
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & pyo3::ffi::PyBUF_ND == pyo3::ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & pyo3::ffi::PyBUF_STRIDES == pyo3::ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
            (*view).obj = slf.into_any().into_ptr();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}
