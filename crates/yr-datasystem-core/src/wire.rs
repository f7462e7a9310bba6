//! Between the KV and stream types and the wire's (`yr.ds.v1`): write parameters, producer
//! and subscription configurations, and timeouts (errors: `yr_proto::error`). Shared by the data
//! worker's service and the client in `yr-runtime`.

use std::time::Duration;

use yr_common::{Error, ErrorCode};
use yr_proto::ds as pb;

use crate::kv::{CacheType, Existence, SetParam, WriteMode};
use crate::stream::{ProducerConfig, ReplicaUpdate, SubscriptionConfig, SubscriptionType};

/// A producer configuration for the wire.
pub fn producer_config_to_proto(config: &ProducerConfig) -> pb::ProducerConfig {
    pb::ProducerConfig {
        delay_flush_time_us: u64::try_from(config.delay_flush_time.as_micros()).unwrap_or(u64::MAX),
        page_size: config.page_size as u64,
        max_stream_size: config.max_stream_size as u64,
        retain_for_num_consumers: config.retain_for_num_consumers,
        auto_clean_up: config.auto_clean_up,
    }
}

/// A producer configuration from the wire (not validated yet).
pub fn producer_config_from_proto(config: &pb::ProducerConfig) -> ProducerConfig {
    ProducerConfig {
        delay_flush_time: Duration::from_micros(config.delay_flush_time_us),
        page_size: usize::try_from(config.page_size).unwrap_or(usize::MAX),
        max_stream_size: usize::try_from(config.max_stream_size).unwrap_or(usize::MAX),
        retain_for_num_consumers: config.retain_for_num_consumers,
        auto_clean_up: config.auto_clean_up,
    }
}

/// A subscription type for the wire.
pub fn subscription_type_to_proto(kind: SubscriptionType) -> pb::SubscriptionType {
    match kind {
        SubscriptionType::Stream => pb::SubscriptionType::Stream,
        SubscriptionType::RoundRobin => pb::SubscriptionType::RoundRobin,
    }
}

/// A subscription from the wire; 1001 for an unknown type.
pub fn subscription_from_proto(name: String, kind: i32) -> Result<SubscriptionConfig, Error> {
    let subscription_type = match pb::SubscriptionType::try_from(kind) {
        Ok(pb::SubscriptionType::Stream) => SubscriptionType::Stream,
        Ok(pb::SubscriptionType::RoundRobin) => SubscriptionType::RoundRobin,
        Err(_) => {
            return Err(Error::new(
                ErrorCode::ParamInvalid,
                format!("{kind} is not a subscription type"),
            ))
        }
    };
    Ok(SubscriptionConfig {
        subscription_name: name,
        subscription_type,
    })
}

/// A write parameter for the wire.
pub fn set_param_to_proto(param: &SetParam) -> pb::SetParam {
    pb::SetParam {
        existence: match param.existence {
            Existence::None => pb::Existence::None,
            Existence::NX => pb::Existence::Nx,
        } as i32,
        write_mode: match param.write_mode {
            WriteMode::NoneL2Cache => pb::WriteMode::NoneL2Cache,
            WriteMode::WriteThroughL2Cache => pb::WriteMode::WriteThroughL2Cache,
            WriteMode::WriteBackL2Cache => pb::WriteMode::WriteBackL2Cache,
            WriteMode::NoneL2CacheEvict => pb::WriteMode::NoneL2CacheEvict,
        } as i32,
        ttl_second: param.ttl_second,
        cache_type: match param.cache_type {
            CacheType::Memory => pb::CacheType::Memory,
            CacheType::Disk => pb::CacheType::Disk,
        } as i32,
    }
}

/// A write parameter from the wire; 1001 for a value outside an enum.
pub fn set_param_from_proto(param: &pb::SetParam) -> Result<SetParam, Error> {
    let bad = |field: &str, value: i32| {
        Error::new(
            ErrorCode::ParamInvalid,
            format!("{value} is not a KV {field}"),
        )
    };
    Ok(SetParam {
        existence: match pb::Existence::try_from(param.existence) {
            Ok(pb::Existence::None) => Existence::None,
            Ok(pb::Existence::Nx) => Existence::NX,
            Err(_) => return Err(bad("existence", param.existence)),
        },
        write_mode: match pb::WriteMode::try_from(param.write_mode) {
            Ok(pb::WriteMode::NoneL2Cache) => WriteMode::NoneL2Cache,
            Ok(pb::WriteMode::WriteThroughL2Cache) => WriteMode::WriteThroughL2Cache,
            Ok(pb::WriteMode::WriteBackL2Cache) => WriteMode::WriteBackL2Cache,
            Ok(pb::WriteMode::NoneL2CacheEvict) => WriteMode::NoneL2CacheEvict,
            Err(_) => return Err(bad("write mode", param.write_mode)),
        },
        ttl_second: param.ttl_second,
        cache_type: match pb::CacheType::try_from(param.cache_type) {
            Ok(pb::CacheType::Memory) => CacheType::Memory,
            Ok(pb::CacheType::Disk) => CacheType::Disk,
            Err(_) => return Err(bad("cache type", param.cache_type)),
        },
    })
}

/// A timeout for the wire, in milliseconds (saturating: `Duration::MAX` waits forever).
pub fn timeout_to_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// A home's update of stream `stream` for its backup, from the home at `home`.
pub fn replica_update_to_proto(
    stream: &str,
    home: &str,
    update: ReplicaUpdate,
) -> pb::StreamReplicateRequest {
    pb::StreamReplicateRequest {
        stream: stream.to_string(),
        home: home.to_string(),
        config: update.config.as_ref().map(producer_config_to_proto),
        low: update.low,
        first_id: update.first_id,
        elements: update.elements,
        holes: update.holes,
        next_id: update.next_id,
        producers: update
            .producers
            .into_iter()
            .map(|(id, batch)| pb::StreamReplicaProducer { id, batch })
            .collect(),
        subscriptions: update
            .subscriptions
            .into_iter()
            .map(|(name, kind, start)| pb::StreamReplicaSubscription {
                name,
                subscription_type: subscription_type_to_proto(kind) as i32,
                start,
            })
            .collect(),
        removed: false,
    }
}

/// A home's update from the wire; 1001 for an unknown subscription type.
pub fn replica_update_from_proto(
    request: pb::StreamReplicateRequest,
) -> Result<ReplicaUpdate, Error> {
    let mut subscriptions = Vec::with_capacity(request.subscriptions.len());
    for subscription in request.subscriptions {
        let config = subscription_from_proto(subscription.name, subscription.subscription_type)?;
        subscriptions.push((
            config.subscription_name,
            config.subscription_type,
            subscription.start,
        ));
    }
    Ok(ReplicaUpdate {
        config: request.config.as_ref().map(producer_config_from_proto),
        low: request.low,
        first_id: request.first_id,
        elements: request.elements,
        holes: request.holes,
        next_id: request.next_id,
        producers: request
            .producers
            .into_iter()
            .map(|producer| (producer.id, producer.batch))
            .collect(),
        subscriptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_params_round_trip() {
        for existence in [Existence::None, Existence::NX] {
            for write_mode in [
                WriteMode::NoneL2Cache,
                WriteMode::WriteThroughL2Cache,
                WriteMode::WriteBackL2Cache,
                WriteMode::NoneL2CacheEvict,
            ] {
                for cache_type in [CacheType::Memory, CacheType::Disk] {
                    let param = SetParam {
                        existence,
                        write_mode,
                        ttl_second: 7,
                        cache_type,
                    };
                    assert_eq!(
                        set_param_from_proto(&set_param_to_proto(&param)).unwrap(),
                        param
                    );
                }
            }
        }
        let bad = pb::SetParam {
            write_mode: 99,
            ..Default::default()
        };
        assert_eq!(
            set_param_from_proto(&bad).unwrap_err().code(),
            ErrorCode::ParamInvalid
        );
    }
}
