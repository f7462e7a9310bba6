//! The configuration of producers and subscriptions, the limits on names, pages and receives,
//! the element type, and the checks of names, configurations and elements (1001).

use std::time::Duration;

use bytes::Bytes;
use yr_common::Result;

use super::StreamError;

/// The longest stream or subscription name, in bytes.
pub const MAX_NAME_SIZE: usize = 255;
/// Page sizes are multiples of this (4 KiB).
pub const PAGE_ALIGNMENT: usize = 4 * 1024;
/// The largest page (16 MiB).
pub const MAX_PAGE_SIZE: usize = 16 * 1024 * 1024;
/// The most subscriptions a producer may ask to retain elements for.
pub const MAX_RETAIN_FOR_NUM_CONSUMERS: u32 = 16;
/// The most bytes one receive returns when it was not given a number to expect.
pub const MAX_RECEIVE_BYTES: usize = 16 * 1024 * 1024;

/// How a producer writes to its stream (openYuanrong's `ProducerConf`).
///
/// ```
/// use std::time::Duration;
/// use yr_datasystem_core::stream::ProducerConfig;
/// let config = ProducerConfig::default();
/// assert_eq!(config.delay_flush_time, Duration::from_millis(5));
/// assert_eq!(config.page_size, 1024 * 1024);
/// assert!(config.validate().is_ok());
/// let bad = ProducerConfig { page_size: 0, ..ProducerConfig::default() };
/// assert_eq!(bad.validate().unwrap_err().code().number(), 1001);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProducerConfig {
    /// The longest a sent element waits in the producer before it is flushed to the stream
    /// (default 5 ms; zero flushes every element at once).
    pub delay_flush_time: Duration,
    /// The producer's batch: a full page is flushed at once (default 1 MiB; a multiple of
    /// 4 KiB, at most 16 MiB).
    pub page_size: usize,
    /// The most bytes the stream holds that some subscription has not acked yet (default
    /// 100 MiB; at least `page_size`). A send waits for room.
    pub max_stream_size: usize,
    /// Keep elements for the first N subscriptions, even those created after the elements
    /// were sent (default 0: elements sent while there is no subscription are dropped; at most
    /// 16).
    pub retain_for_num_consumers: u32,
    /// Remove the stream when its last producer or consumer closes (default false).
    pub auto_clean_up: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            delay_flush_time: Duration::from_millis(5),
            page_size: 1024 * 1024,
            max_stream_size: 100 * 1024 * 1024,
            retain_for_num_consumers: 0,
            auto_clean_up: false,
        }
    }
}

impl ProducerConfig {
    /// Check the configuration: 1001 naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.page_size == 0
            || !self.page_size.is_multiple_of(PAGE_ALIGNMENT)
            || self.page_size > MAX_PAGE_SIZE
        {
            return Err(StreamError::InvalidArgument(format!(
                "page_size {} is invalid; use a multiple of 4096 bytes between 4 KiB and 16 MiB",
                self.page_size
            ))
            .into());
        }
        if self.max_stream_size < self.page_size {
            return Err(StreamError::InvalidArgument(format!(
                "max_stream_size {} is smaller than page_size {}; use a max_stream_size of at \
                 least one page",
                self.max_stream_size, self.page_size
            ))
            .into());
        }
        if self.retain_for_num_consumers > MAX_RETAIN_FOR_NUM_CONSUMERS {
            return Err(StreamError::InvalidArgument(format!(
                "retain_for_num_consumers {} is larger than {MAX_RETAIN_FOR_NUM_CONSUMERS}; use \
                 0 to {MAX_RETAIN_FOR_NUM_CONSUMERS}",
                self.retain_for_num_consumers
            ))
            .into());
        }
        Ok(())
    }
}

/// How the consumers of one subscription share its elements.
///
/// ```
/// use yr_datasystem_core::stream::SubscriptionType;
/// assert_eq!(SubscriptionType::default(), SubscriptionType::Stream);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubscriptionType {
    /// openYuanrong's `STREAM`: the subscription has one consumer, which gets every element.
    #[default]
    Stream,
    /// A shared subscription (beyond openYuanrong, which defines `ROUND_ROBIN` but does not
    /// support it): any number of consumers join it, and each element goes to one of them, in
    /// turn.
    RoundRobin,
}

/// A consumer's subscription (openYuanrong's `SubscriptionConfig`).
///
/// ```
/// use yr_datasystem_core::stream::{SubscriptionConfig, SubscriptionType};
/// let shared = SubscriptionConfig::new("workers", SubscriptionType::RoundRobin);
/// assert!(shared.validate().is_ok());
/// assert_eq!(SubscriptionConfig::new("", SubscriptionType::Stream).validate().unwrap_err().code().number(), 1001);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// The subscription's name: unique per stream for [`SubscriptionType::Stream`], shared by
    /// the consumers of a [`SubscriptionType::RoundRobin`] subscription.
    pub subscription_name: String,
    /// How its consumers share the elements.
    pub subscription_type: SubscriptionType,
}

impl SubscriptionConfig {
    /// A subscription named `name` of type `subscription_type`.
    pub fn new(name: impl Into<String>, subscription_type: SubscriptionType) -> Self {
        SubscriptionConfig {
            subscription_name: name.into(),
            subscription_type,
        }
    }

    /// Check the subscription: a name of 1 to 255 bytes, else 1001.
    pub fn validate(&self) -> Result<()> {
        validate_name("subscription", &self.subscription_name)
    }
}

/// A received element: its id in the stream (acks name it) and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// The element's id: 1 for the stream's first element, then one more per element.
    pub id: u64,
    /// The bytes the producer sent.
    pub value: Bytes,
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_SIZE {
        return Err(StreamError::InvalidArgument(format!(
            "the {what} name {name:?} is {} bytes; use a name of 1 to {MAX_NAME_SIZE} bytes",
            name.len()
        ))
        .into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:/@".contains(*c)))
    {
        return Err(StreamError::InvalidArgument(format!(
            "the {what} name {name:?} contains {bad:?}; use letters, digits and - _ . : / @"
        ))
        .into());
    }
    Ok(())
}

/// Check a stream name: 1 to 255 bytes of letters, digits and `-_.:/@`, else 1001.
pub fn validate_stream_name(name: &str) -> Result<()> {
    validate_name("stream", name)
}

/// Check one element against its producer's configuration: at most `max_stream_size` bytes.
pub fn validate_element(stream: &str, len: usize, config: &ProducerConfig) -> Result<()> {
    if len > config.max_stream_size {
        return Err(StreamError::InvalidArgument(format!(
            "an element of {len} bytes cannot fit stream {stream:?}, whose max_stream_size is {} \
             bytes; send smaller elements or raise max_stream_size",
            config.max_stream_size
        ))
        .into());
    }
    Ok(())
}
