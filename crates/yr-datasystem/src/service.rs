//! The DataWorker gRPC service (`yr.ds.v1`) over a [`KvStore`] and the node's streams
//! ([`StreamService`]). The KV store's calls block (on the second-level store's IO), so they
//! run on tokio's blocking threads; a get that waits for keys not written yet waits
//! asynchronously, woken by the writes. Stream sends and receives wait on blocking threads too.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use yr_common::{Error, Result};
use yr_proto::ds as pb;

use yr_datasystem_core::kv::{self, KvStore};
use yr_datasystem_core::stream::StreamStore;
use yr_datasystem_core::wire::{
    producer_config_from_proto, set_param_from_proto, subscription_from_proto,
};
use yr_proto::error_to_proto;

use crate::error::DataSystemError;
use crate::kv_cluster::{found_response, KvCluster};
use crate::stream_service::StreamService;

/// The DataWorker service.
#[derive(Clone, Debug)]
pub struct DataWorkerService {
    kv: KvStore,
    streams: StreamService,
    /// In a cluster: routes KV requests to their keys' owners.
    cluster: Option<Arc<KvCluster>>,
}

impl DataWorkerService {
    /// The service over `kv`, with streams that all live here.
    pub fn new(kv: KvStore) -> DataWorkerService {
        DataWorkerService::with_streams(kv, StreamService::new(StreamStore::new(), None))
    }

    /// The service over `kv` and `streams`.
    pub fn with_streams(kv: KvStore, streams: StreamService) -> DataWorkerService {
        DataWorkerService {
            kv,
            streams,
            cluster: None,
        }
    }

    /// The same service, routing each KV request to its key's owner through `cluster`.
    pub fn in_cluster(mut self, cluster: Option<Arc<KvCluster>>) -> DataWorkerService {
        self.cluster = cluster;
        self
    }

    /// The tonic server for this service, accepting messages of any size (KV values are up to
    /// 64 MiB, checked by the store; stream elements up to their stream's `max_stream_size`).
    pub fn server(self) -> pb::data_worker_server::DataWorkerServer<DataWorkerService> {
        pb::data_worker_server::DataWorkerServer::new(self)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes())
    }
}

/// Run a blocking store call (KV or streams) on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| Error::from(DataSystemError::from_join(&e)))?
}

/// The values of `keys`, waiting up to `timeout` for keys not written yet.
pub async fn get_waiting(kv: &KvStore, keys: Vec<String>, timeout: Duration) -> Result<Vec<Bytes>> {
    kv::validate_keys(&keys)?;
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let notify = Arc::new(Notify::new());
    let waker = {
        let notify = notify.clone();
        Arc::new(move || notify.notify_one())
    };
    // Watch before the first look, so that a write in between is not missed.
    let _watch = kv.watch(&keys, waker);
    let keys = Arc::new(keys);
    loop {
        let values = {
            let (kv, keys) = (kv.clone(), keys.clone());
            blocking(move || kv.try_get(&keys)).await?
        };
        let missing = missing_keys(&keys, &values);
        if missing.is_empty() {
            return Ok(values.into_iter().flatten().collect());
        }
        let woken = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, notify.notified())
                .await
                .is_ok(),
            None => {
                notify.notified().await;
                true
            }
        };
        if !woken {
            let values = {
                let (kv, keys) = (kv.clone(), keys.clone());
                blocking(move || kv.try_get(&keys)).await?
            };
            if values.iter().all(Option::is_some) {
                return Ok(values.into_iter().flatten().collect());
            }
            let missing = missing_keys(&keys, &values);
            return Err(kv::timeout_error(&missing, timeout));
        }
    }
}

fn error_of<T>(result: &Result<T>) -> Option<yr_proto::v1::ErrorInfo> {
    result.as_ref().err().map(error_to_proto)
}

fn stream_response(result: Result<Option<String>>) -> Response<pb::StreamResponse> {
    Response::new(match result {
        Ok(home) => pb::StreamResponse {
            home: home.unwrap_or_default(),
            error: None,
        },
        Err(error) => pb::StreamResponse {
            home: String::new(),
            error: Some(error_to_proto(&error)),
        },
    })
}

fn create_response(result: Result<(u64, Option<String>)>) -> Response<pb::StreamCreateResponse> {
    Response::new(match result {
        Ok((id, home)) => pb::StreamCreateResponse {
            id,
            home: home.unwrap_or_default(),
            error: None,
        },
        Err(error) => pb::StreamCreateResponse {
            id: 0,
            home: String::new(),
            error: Some(error_to_proto(&error)),
        },
    })
}

#[tonic::async_trait]
impl pb::data_worker_server::DataWorker for DataWorkerService {
    async fn kv_set(
        &self,
        request: Request<pb::KvSetRequest>,
    ) -> Result<Response<pb::KvSetResponse>, Status> {
        let request = request.into_inner();
        if let Some(cluster) = &self.cluster {
            let result = cluster.set(request).await;
            return Ok(Response::new(pb::KvSetResponse {
                error: error_of(&result),
            }));
        }
        let kv = self.kv.clone();
        let result = match set_param_from_proto(&request.param.unwrap_or_default()) {
            Ok(param) => {
                blocking(move || {
                    kv.set_for_job(&request.job_id, &request.key, request.value, &param)
                })
                .await
            }
            Err(error) => Err(error),
        };
        Ok(Response::new(pb::KvSetResponse {
            error: error_of(&result),
        }))
    }

    async fn kv_get(
        &self,
        request: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvGetResponse>, Status> {
        let request = request.into_inner();
        let timeout = Duration::from_millis(request.timeout_ms);
        if let Some(cluster) = &self.cluster {
            let route = pb::KvRoute::try_from(request.route).unwrap_or(pb::KvRoute::Client);
            let result = cluster.get(request.keys, timeout, route).await;
            return Ok(Response::new(found_response(result, route)));
        }
        let result = get_waiting(&self.kv, request.keys, timeout).await;
        Ok(Response::new(match result {
            Ok(values) => pb::KvGetResponse {
                values,
                error: None,
                found: Vec::new(),
            },
            Err(error) => pb::KvGetResponse {
                values: Vec::new(),
                error: Some(error_to_proto(&error)),
                found: Vec::new(),
            },
        }))
    }

    async fn kv_get_range(
        &self,
        request: Request<pb::KvGetRangeRequest>,
    ) -> Result<Response<pb::KvGetRangeResponse>, Status> {
        let request = request.into_inner();
        let timeout = Duration::from_millis(request.timeout_ms);
        let values = match &self.cluster {
            Some(cluster) => cluster
                .get(vec![request.key.clone()], timeout, pb::KvRoute::Client)
                .await
                .map(|values| values.into_iter().flatten().collect()),
            None => get_waiting(&self.kv, vec![request.key.clone()], timeout).await,
        };
        let result = values.and_then(|mut values: Vec<Bytes>| {
            let value = values.pop().unwrap_or_default();
            kv::slice_range(&request.key, &value, request.offset, request.size)
        });
        Ok(Response::new(match result {
            Ok(value) => pb::KvGetRangeResponse { value, error: None },
            Err(error) => pb::KvGetRangeResponse {
                value: Bytes::new(),
                error: Some(error_to_proto(&error)),
            },
        }))
    }

    async fn kv_del(
        &self,
        request: Request<pb::KvDelRequest>,
    ) -> Result<Response<pb::KvDelResponse>, Status> {
        let request = request.into_inner();
        let keys = request.keys;
        let result = match &self.cluster {
            Some(cluster) => {
                let route = pb::KvRoute::try_from(request.route).unwrap_or(pb::KvRoute::Client);
                cluster.del(keys, route).await
            }
            None => {
                let kv = self.kv.clone();
                blocking(move || kv.del(&keys)).await
            }
        };
        Ok(Response::new(pb::KvDelResponse {
            error: error_of(&result),
        }))
    }

    async fn kv_exist(
        &self,
        request: Request<pb::KvExistRequest>,
    ) -> Result<Response<pb::KvExistResponse>, Status> {
        let request = request.into_inner();
        let keys = request.keys;
        let result = match &self.cluster {
            Some(cluster) => {
                let route = pb::KvRoute::try_from(request.route).unwrap_or(pb::KvRoute::Client);
                cluster.exist(keys, route).await
            }
            None => {
                let kv = self.kv.clone();
                blocking(move || kv.exist(&keys)).await
            }
        };
        Ok(Response::new(match result {
            Ok(exists) => pb::KvExistResponse {
                exists,
                error: None,
            },
            Err(error) => pb::KvExistResponse {
                exists: Vec::new(),
                error: Some(error_to_proto(&error)),
            },
        }))
    }

    async fn kv_adopt(
        &self,
        request: Request<pb::KvAdoptRequest>,
    ) -> Result<Response<pb::KvAdoptResponse>, Status> {
        let entries = request.into_inner().entries;
        let result = match &self.cluster {
            Some(cluster) => cluster.adopt(entries).await,
            None => Err(Error::new(
                yr_common::ErrorCode::ParamInvalid,
                "this data worker is not in a cluster, so no KV keys move to it",
            )),
        };
        Ok(Response::new(match result {
            Ok(taken) => pb::KvAdoptResponse { taken, error: None },
            Err(error) => pb::KvAdoptResponse {
                taken: Vec::new(),
                error: Some(error_to_proto(&error)),
            },
        }))
    }

    async fn stream_create_producer(
        &self,
        request: Request<pb::StreamCreateProducerRequest>,
    ) -> Result<Response<pb::StreamCreateResponse>, Status> {
        let request = request.into_inner();
        let config = producer_config_from_proto(&request.config.unwrap_or_default());
        Ok(create_response(
            self.streams
                .create_producer(request.stream, config, request.resume_id)
                .await,
        ))
    }

    async fn stream_create_consumer(
        &self,
        request: Request<pb::StreamCreateConsumerRequest>,
    ) -> Result<Response<pb::StreamCreateResponse>, Status> {
        let request = request.into_inner();
        let result =
            match subscription_from_proto(request.subscription_name, request.subscription_type) {
                Ok(subscription) => {
                    self.streams
                        .create_consumer(
                            request.stream,
                            subscription,
                            request.resume_id,
                            request.resume_after,
                        )
                        .await
                }
                Err(error) => Err(error),
            };
        Ok(create_response(result))
    }

    async fn stream_send(
        &self,
        request: Request<pb::StreamSendRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let request = request.into_inner();
        let timeout = Duration::from_millis(request.timeout_ms);
        let result = self
            .streams
            .send(
                request.stream,
                request.producer_id,
                request.batch,
                request.elements,
                timeout,
            )
            .await;
        Ok(stream_response(result))
    }

    async fn stream_receive(
        &self,
        request: Request<pb::StreamReceiveRequest>,
    ) -> Result<Response<pb::StreamReceiveResponse>, Status> {
        let request = request.into_inner();
        let timeout = Duration::from_millis(request.timeout_ms);
        let expect_num = usize::try_from(request.expect_num).unwrap_or(usize::MAX);
        let result = self
            .streams
            .receive(request.stream, request.consumer_id, expect_num, timeout)
            .await;
        Ok(Response::new(match result {
            Ok((elements, home)) => {
                let (ids, values) = elements.into_iter().map(|e| (e.id, e.value)).unzip();
                pb::StreamReceiveResponse {
                    ids,
                    values,
                    error: None,
                    home: home.unwrap_or_default(),
                }
            }
            Err(error) => pb::StreamReceiveResponse {
                ids: Vec::new(),
                values: Vec::new(),
                error: Some(error_to_proto(&error)),
                home: String::new(),
            },
        }))
    }

    async fn stream_ack(
        &self,
        request: Request<pb::StreamAckRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .streams
            .ack(&request.stream, request.consumer_id, request.element_id)
            .await;
        Ok(stream_response(result))
    }

    async fn stream_replicate(
        &self,
        request: Request<pb::StreamReplicateRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        Ok(stream_response(
            self.streams.replica_update(request.into_inner()),
        ))
    }

    async fn stream_close_producer(
        &self,
        request: Request<pb::StreamCloseRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let request = request.into_inner();
        let result = self.streams.close(request.stream, request.id, false).await;
        Ok(stream_response(result))
    }

    async fn stream_close_consumer(
        &self,
        request: Request<pb::StreamCloseRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let request = request.into_inner();
        let result = self.streams.close(request.stream, request.id, true).await;
        Ok(stream_response(result))
    }

    async fn stream_delete(
        &self,
        request: Request<pb::StreamNameRequest>,
    ) -> Result<Response<pb::StreamResponse>, Status> {
        let name = request.into_inner().stream;
        Ok(stream_response(self.streams.delete(name).await))
    }

    async fn stream_query(
        &self,
        request: Request<pb::StreamNameRequest>,
    ) -> Result<Response<pb::StreamQueryResponse>, Status> {
        let name = request.into_inner().stream;
        Ok(Response::new(match self.streams.query(name).await {
            Ok(((producers, consumers), home)) => pb::StreamQueryResponse {
                producers,
                consumers,
                home: home.unwrap_or_default(),
                error: None,
            },
            Err(error) => pb::StreamQueryResponse {
                producers: 0,
                consumers: 0,
                home: String::new(),
                error: Some(error_to_proto(&error)),
            },
        }))
    }
}

/// The keys of `keys` whose value in `values` (in the same order) is missing.
pub(crate) fn missing_keys<'a, T>(keys: &'a [String], values: &[Option<T>]) -> Vec<&'a str> {
    keys.iter()
        .zip(values)
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::data_worker_server::DataWorker;
    use yr_common::ErrorCode;
    use yr_datasystem_core::kv::SetParam;

    fn service() -> DataWorkerService {
        DataWorkerService::new(KvStore::new())
    }

    #[tokio::test]
    async fn set_get_exist_del_over_the_service() {
        let service = service();
        let set = service
            .kv_set(Request::new(pb::KvSetRequest {
                key: "k".into(),
                value: Bytes::from_static(b"0123456789"),
                param: Some(yr_datasystem_core::wire::set_param_to_proto(
                    &SetParam::default(),
                )),
                job_id: "job-a".into(),
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.error, None);
        // The write counts under the job it names.
        assert_eq!(service.kv.job_bytes("job-a"), 11);
        let got = service
            .kv_get(Request::new(pb::KvGetRequest {
                keys: vec!["k".into()],
                timeout_ms: 0,
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.values, vec![Bytes::from_static(b"0123456789")]);
        let range = service
            .kv_get_range(Request::new(pb::KvGetRangeRequest {
                key: "k".into(),
                offset: 3,
                size: 2,
                timeout_ms: 0,
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(range.value, Bytes::from_static(b"34"));
        let exist = service
            .kv_exist(Request::new(pb::KvExistRequest {
                keys: vec!["k".into(), "no".into()],
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(exist.exists, vec![true, false]);
        let del = service
            .kv_del(Request::new(pb::KvDelRequest {
                keys: vec!["k".into()],
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(del.error, None);
        assert_eq!(service.kv.memory_bytes(), 0);
    }

    #[tokio::test]
    async fn errors_travel_in_the_response() {
        let service = service();
        let set = service
            .kv_set(Request::new(pb::KvSetRequest {
                key: String::new(),
                value: Bytes::new(),
                param: None,
                job_id: String::new(),
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(set.error.unwrap().code, ErrorCode::ParamInvalid.number());
        let got = service
            .kv_get(Request::new(pb::KvGetRequest {
                keys: vec!["never".into()],
                timeout_ms: 100,
                route: pb::KvRoute::Client as i32,
            }))
            .await
            .unwrap()
            .into_inner();
        let error = got.error.unwrap();
        assert_eq!(error.code, ErrorCode::GetOperationFailed.number());
        assert!(error.message.contains("never"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_get_is_answered_by_a_later_set() {
        let kv = KvStore::new();
        let writer = kv.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer
                .set("late", Bytes::from_static(b"v"), &SetParam::default())
                .unwrap();
        });
        let values = get_waiting(&kv, vec!["late".into()], Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(values, vec![Bytes::from_static(b"v")]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
