//! The Prometheus metrics a process reports, built with the `prometheus-client` crate. yr's
//! processes read their figures from the components that own them (the node's instance table,
//! the master's registry, the data worker's stores) when `/metrics` is scraped, so a
//! [`Metrics`] is filled at each scrape and encoded in the Prometheus text format (0.0.4) that
//! [`crate::http::serve_metrics`] serves.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// One label: its name and value.
type Labels = Vec<(String, String)>;

/// The metrics of one scrape.
///
/// ```
/// let mut metrics = yr_transport::metrics::Metrics::default();
/// metrics.gauge("yr_node_runtimes", "Runtime processes running.", 3);
/// metrics.counter("yr_node_creates", "Create requests taken in.", 7);
/// metrics.gauges(
///     "yr_node_instances",
///     "Instances on this node, by state.",
///     "state",
///     [("RUNNING", 2), ("FATAL", 0)],
/// );
/// let text = metrics.encode();
/// assert!(text.contains("yr_node_runtimes 3\n"));
/// assert!(text.contains("yr_node_creates_total 7\n"));
/// assert!(text.contains("yr_node_instances{state=\"RUNNING\"} 2\n"));
/// ```
#[derive(Debug, Default)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.registry.register(name, help, ConstGauge::new(value));
    }

    /// A counter: a count that only grows. Its name gets `_total` appended.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.registry.register(name, help, ConstCounter::new(value));
    }

    /// A gauge with one label, one sample per `(label value, value)`.
    pub fn gauges<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, i64)>,
    ) {
        let family = Family::<Labels, Gauge>::default();
        for (value_of_label, value) in samples {
            family
                .get_or_create(&vec![(label.to_string(), value_of_label.to_string())])
                .set(value);
        }
        self.registry.register(name, help, family);
    }

    /// A counter with one label, one sample per `(label value, value)`. Its name gets `_total`
    /// appended.
    pub fn counters<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        let family = Family::<Labels, Counter>::default();
        for (value_of_label, value) in samples {
            family
                .get_or_create(&vec![(label.to_string(), value_of_label.to_string())])
                .inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    /// The Prometheus text exposition of these metrics.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) = prometheus_text::encode(&mut out, &self.registry) {
            // Writing to a String does not fail; an encoder error is a bug in a name.
            tracing::error!(%error, "the metrics could not be encoded");
        }
        out
    }
}
