//! Streams for Python (openYuanrong's `create_stream_producer`/`create_stream_consumer`): a
//! producer and a consumer over the core's stream clients, the same ones the Rust SDK uses, so
//! names, configurations, sizes and codes are checked once, in the core. The pure-Python
//! `yr.stream` holds the configuration classes and `Element`.

use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use yr_runtime::stream::{
    ConsumerClient, ProducerClient, ProducerConfig, SubscriptionConfig, SubscriptionType,
};

use crate::api::runtime;
use crate::errors::OrRaise;

/// A producer of one stream.
#[pyclass(module = "yr._yr", frozen)]
pub struct Producer {
    inner: Arc<dyn ProducerClient>,
}

#[pymethods]
impl Producer {
    /// Send `value`, waiting up to `timeout_ms` for room (1001 for an element over the
    /// stream's size, 4202 if no room came in time).
    fn send(&self, py: Python<'_>, value: &[u8], timeout_ms: u64) -> PyResult<()> {
        let inner = self.inner.clone();
        py.allow_threads(|| inner.send(value, Duration::from_millis(timeout_ms)))
            .py_err(py, "failed to send to stream")
    }

    /// Flush what is buffered and close.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        py.allow_threads(|| inner.close())
            .py_err(py, "failed to close producer")
    }
}

/// A consumer of one subscription.
#[pyclass(module = "yr._yr", frozen)]
pub struct Consumer {
    inner: Arc<dyn ConsumerClient>,
}

#[pymethods]
impl Consumer {
    /// Up to `expect_num` elements (0: what is ready), waiting up to `timeout_ms`: a list of
    /// `(id, bytes)`.
    fn receive<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: u64,
        expect_num: usize,
    ) -> PyResult<Vec<(u64, Bound<'py, PyBytes>)>> {
        let inner = self.inner.clone();
        let elements = py
            .allow_threads(|| inner.receive(Duration::from_millis(timeout_ms), expect_num))
            .py_err(py, "failed to receive from stream")?;
        Ok(elements
            .iter()
            .map(|element| (element.id, PyBytes::new(py, &element.value)))
            .collect())
    }

    /// Acknowledge every element up to `element_id`.
    fn ack(&self, py: Python<'_>, element_id: u64) -> PyResult<()> {
        let inner = self.inner.clone();
        py.allow_threads(|| inner.ack(element_id))
            .py_err(py, "failed to ack stream element")
    }

    /// Close (acks what was received).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        py.allow_threads(|| inner.close())
            .py_err(py, "failed to close consumer")
    }
}

/// A producer of stream `name` (the core checks the name and the configuration: 1001).
#[pyfunction]
fn create_stream_producer(
    py: Python<'_>,
    name: &str,
    delay_flush_time_ms: u64,
    page_size: usize,
    max_stream_size: usize,
    retain_for_num_consumers: u32,
    auto_clean_up: bool,
) -> PyResult<Producer> {
    let runtime = runtime(py)?;
    let config = ProducerConfig {
        delay_flush_time: Duration::from_millis(delay_flush_time_ms),
        page_size,
        max_stream_size,
        retain_for_num_consumers,
        auto_clean_up,
    };
    let inner = py
        .allow_threads(|| runtime.streams().create_producer(name, &config))
        .py_err(py, "failed to create stream producer")?;
    Ok(Producer {
        inner: Arc::from(inner),
    })
}

/// A consumer of stream `name` in subscription `subscription_name` (`round_robin`: shared by
/// its consumers, each element to one of them).
#[pyfunction]
fn create_stream_consumer(
    py: Python<'_>,
    name: &str,
    subscription_name: &str,
    round_robin: bool,
) -> PyResult<Consumer> {
    let runtime = runtime(py)?;
    let subscription_type = if round_robin {
        SubscriptionType::RoundRobin
    } else {
        SubscriptionType::Stream
    };
    let subscription = SubscriptionConfig::new(subscription_name, subscription_type);
    let inner = py
        .allow_threads(|| runtime.streams().create_consumer(name, &subscription))
        .py_err(py, "failed to create stream consumer")?;
    Ok(Consumer {
        inner: Arc::from(inner),
    })
}

/// Delete stream `name` (4299 while it has producers or consumers).
#[pyfunction]
fn delete_stream(py: Python<'_>, name: &str) -> PyResult<()> {
    let runtime = runtime(py)?;
    py.allow_threads(|| runtime.streams().delete_stream(name))
        .py_err(py, "failed to delete stream")
}

/// The producers and the consumers of stream `name`, in the whole cluster.
#[pyfunction]
fn stream_counts(py: Python<'_>, name: &str) -> PyResult<(u64, u64)> {
    let runtime = runtime(py)?;
    py.allow_threads(|| runtime.streams().counts(name))
        .py_err(py, "failed to query stream")
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Producer>()?;
    m.add_class::<Consumer>()?;
    m.add_function(wrap_pyfunction!(create_stream_producer, m)?)?;
    m.add_function(wrap_pyfunction!(create_stream_consumer, m)?)?;
    m.add_function(wrap_pyfunction!(delete_stream, m)?)?;
    m.add_function(wrap_pyfunction!(stream_counts, m)?)?;
    Ok(())
}
