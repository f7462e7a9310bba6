//! KV in a cluster: unary calls to the node's DataWorker service, over a channel of its own to
//! the same address (the node's Unix socket) as the Bus. The calls run on the backend's IO
//! runtime; the caller's thread waits for the answer.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::Channel;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::kv::{validate_keys, validate_set};
use yr_datasystem_core::wire::{set_param_to_proto, timeout_to_ms};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_proto::error_from_proto;

use super::data_channel::DataChannel;
use super::ClusterBackend;
use crate::kv::{KvClient, SetParam};

/// The node's data worker, as a KV client.
pub struct ClusterKv {
    channel: DataChannel,
    /// Sent with every write: the node counts KV memory per job.
    job_id: String,
}

impl ClusterBackend {
    /// A KV client for the node this backend is connected to.
    pub fn kv_client(&self) -> ClusterKv {
        ClusterKv {
            channel: self.inner.data.clone(),
            job_id: self.inner.job_id.clone(),
        }
    }
}

fn check(error: Option<yr_proto::v1::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

impl ClusterKv {
    /// Run one call on the IO runtime and wait for its answer.
    fn call<R, F>(
        &self,
        make: impl FnOnce(DataWorkerClient<Channel>) -> F + Send + 'static,
    ) -> Result<R>
    where
        R: Send + 'static,
        F: Future<Output = std::result::Result<tonic::Response<R>, tonic::Status>> + Send,
    {
        self.channel.call(
            |channel| {
                DataWorkerClient::new(channel)
                    .max_decoding_message_size(yr_transport::max_message_bytes())
                    .max_encoding_message_size(yr_transport::max_message_bytes())
            },
            make,
        )
    }
}

impl KvClient for ClusterKv {
    fn set(&self, key: &str, value: &[u8], param: &SetParam) -> Result<()> {
        validate_set(key, value.len(), param)?;
        let request = pb::KvSetRequest {
            key: key.to_string(),
            value: Bytes::copy_from_slice(value),
            param: Some(set_param_to_proto(param)),
            job_id: self.job_id.clone(),
            route: pb::KvRoute::Client as i32,
        };
        check(
            self.call(move |mut client| async move { client.kv_set(request).await })?
                .error,
        )
    }

    fn get(&self, keys: &[&str], timeout: Duration) -> Result<Vec<Bytes>> {
        validate_keys(keys)?;
        let request = pb::KvGetRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            timeout_ms: timeout_to_ms(timeout),
            route: pb::KvRoute::Client as i32,
        };
        let reply = self.call(move |mut client| async move { client.kv_get(request).await })?;
        check(reply.error)?;
        if reply.values.len() != keys.len() {
            return Err(Error::new(
                ErrorCode::DatasystemFailed,
                format!(
                    "the data worker answered {} values for {} keys",
                    reply.values.len(),
                    keys.len()
                ),
            ));
        }
        Ok(reply.values)
    }

    fn get_range(&self, key: &str, offset: u64, size: u64, timeout: Duration) -> Result<Bytes> {
        validate_keys(&[key])?;
        let request = pb::KvGetRangeRequest {
            key: key.to_string(),
            offset,
            size,
            timeout_ms: timeout_to_ms(timeout),
            route: pb::KvRoute::Client as i32,
        };
        let reply =
            self.call(move |mut client| async move { client.kv_get_range(request).await })?;
        check(reply.error)?;
        Ok(reply.value)
    }

    fn del(&self, keys: &[&str]) -> Result<()> {
        validate_keys(keys)?;
        let request = pb::KvDelRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            route: pb::KvRoute::Client as i32,
        };
        check(
            self.call(move |mut client| async move { client.kv_del(request).await })?
                .error,
        )
    }

    fn exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        validate_keys(keys)?;
        let request = pb::KvExistRequest {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            route: pb::KvRoute::Client as i32,
        };
        let reply = self.call(move |mut client| async move { client.kv_exist(request).await })?;
        check(reply.error)?;
        Ok(reply.exists)
    }
}
