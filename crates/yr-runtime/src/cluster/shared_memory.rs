//! The node's shared memory in a cluster: mapped when the backend connects (the data worker's
//! `PoolInfo`), with regions created, released, spilled, restored and reclaimed from other
//! processes through its `ObjectStore` service; the node's asks to spill for another process
//! ([`answer_spill_ask`]); and values that other processes send as locations: opened in place
//! when they are in this node's memory, pulled into it first (`PullObject`) when they are in
//! another node's.

use std::sync::Arc;

use tonic::transport::Channel;
use yr_common::{Error, ObjectId, Result};
use yr_proto::ds as pb;
use yr_proto::ds::object_store_client::ObjectStoreClient;
use yr_proto::v1 as wire;
use yr_proto::{error_from_proto, error_to_proto};

use super::bus::Bus;
use super::data_channel::DataChannel;
use crate::error::RuntimeError;
use crate::object_store::Payload;
use crate::shared_memory::{self, RegionAllocator, SharedMemory};

fn client(channel: Channel) -> ObjectStoreClient<Channel> {
    ObjectStoreClient::new(channel)
}

fn check(error: Option<wire::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

/// Regions from the node's data worker. Spills, restores and reclaims go through `disk`, a
/// channel on a runtime of their own: a restore may be asked for on the IO thread (sending a
/// spilled object as an argument), which must not wait for itself.
struct NodeAllocator {
    channel: DataChannel,
    disk: DataChannel,
    _disk_runtime: DiskRuntime,
}

/// The runtime of spill and restore calls: one thread, stopped without waiting when dropped
/// (which may happen on any thread, the IO thread included).
struct DiskRuntime(Option<tokio::runtime::Runtime>);

impl Drop for DiskRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn disk_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("yr-spill")
        .enable_all()
        .build()
        .map_err(|source| {
            RuntimeError::Start {
                what: "the runtime of spill and restore calls".to_string(),
                source,
            }
            .into()
        })
}

impl RegionAllocator for NodeAllocator {
    fn create(&self, size: u64) -> Result<(u64, u64, bytes::Bytes)> {
        let reply = self.channel.call(client, move |mut client| async move {
            client
                .create(pb::CreateObjectRequest {
                    size,
                    pid: std::process::id(),
                })
                .await
        })?;
        check(reply.error)?;
        Ok((reply.allocation, reply.offset, reply.capability))
    }

    fn release(&self, allocation: u64) {
        let channel = self.channel.clone();
        self.channel.io().spawn(async move {
            if let Ok(connected) = channel.connected().await {
                let request = pb::ReleaseObjectsRequest {
                    allocations: vec![allocation],
                    pid: std::process::id(),
                };
                if let Err(status) = client(connected).release(request).await {
                    tracing::debug!(allocation, error = %status.message(), "release failed");
                }
            }
        });
    }

    fn spill(&self, allocation: u64, object: ObjectId) -> Result<bool> {
        let reply = self.disk.call(client, move |mut client| async move {
            client
                .spill(pb::SpillObjectRequest {
                    allocation,
                    object_id: object.to_bytes().to_vec().into(),
                    pid: std::process::id(),
                })
                .await
        })?;
        check(reply.error)?;
        Ok(reply.spilled)
    }

    fn restore(&self, object: ObjectId) -> Result<(u64, u64, u64, bytes::Bytes)> {
        let reply = self.disk.call(client, move |mut client| async move {
            client
                .restore(pb::RestoreObjectRequest {
                    object_id: object.to_bytes().to_vec().into(),
                    pid: std::process::id(),
                })
                .await
        })?;
        check(reply.error)?;
        Ok((reply.allocation, reply.offset, reply.size, reply.capability))
    }

    fn hand_over(&self, allocation: u64, receiver: u32) -> Result<()> {
        let reply = self.disk.call(client, move |mut client| async move {
            client
                .retain(pb::RetainObjectRequest {
                    allocation,
                    pid: receiver,
                    for_receiver: true,
                    for_remote_owner: false,
                })
                .await
        })?;
        check(reply.error)
    }

    fn hold_for_remote(&self, allocation: u64) -> Result<()> {
        let reply = self.disk.call(client, move |mut client| async move {
            client
                .retain(pb::RetainObjectRequest {
                    allocation,
                    for_remote_owner: true,
                    ..Default::default()
                })
                .await
        })?;
        check(reply.error)
    }

    fn delete_spilled(&self, object: ObjectId) {
        let channel = self.channel.clone();
        self.channel.io().spawn(async move {
            if let Ok(connected) = channel.connected().await {
                let request = pb::DeleteSpilledRequest {
                    object_ids: vec![object.to_bytes().to_vec().into()],
                    pid: std::process::id(),
                };
                if let Err(status) = client(connected).delete_spilled(request).await {
                    tracing::debug!(%object, error = %status.message(), "delete of a spilled object failed");
                }
            }
        });
    }

    fn reclaim(&self, bytes: u64) -> Result<u64> {
        let reply = self.disk.call(client, move |mut client| async move {
            client
                .reclaim(pb::ReclaimRequest {
                    bytes_needed: bytes,
                    pid: std::process::id(),
                })
                .await
        });
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                // No room from others this time; the caller's 4202 stands.
                tracing::warn!(%error, bytes, "cannot ask the node to reclaim shared memory");
                return Ok(0);
            }
        };
        check(reply.error)?;
        Ok(reply.bytes_freed)
    }
}

/// The node asks this process to spill idle objects worth `ask.bytes` for another process:
/// spill them on a thread of their own (the spill calls block, and this is called on the IO
/// thread) and answer on `bus`, oneway.
pub(super) fn answer_spill_ask(bus: Arc<Bus>, ask: wire::SpillAsk) {
    let answer_bus = bus.clone();
    let ask_id = ask.ask_id;
    let spawned = std::thread::Builder::new()
        .name("yr-spill-ask".into())
        .spawn(move || {
            let spilled = match shared_memory::current() {
                Some(memory) => crate::object_store::spill_idle(&memory, ask.bytes),
                None => Ok(0),
            };
            let answer = match spilled {
                Ok(bytes_freed) => {
                    tracing::debug!(
                        ask = ask_id,
                        wanted = ask.bytes,
                        bytes_freed,
                        "spilled for another process"
                    );
                    wire::SpillAnswer {
                        ask_id,
                        bytes_freed,
                        error: None,
                    }
                }
                Err(error) => {
                    tracing::warn!(ask = ask_id, %error, "cannot spill for another process");
                    wire::SpillAnswer {
                        ask_id,
                        bytes_freed: 0,
                        error: Some(error_to_proto(&error)),
                    }
                }
            };
            answer_bus.send_oneway(wire::bus_request::Body::SpillAnswer(answer));
        });
    if let Err(error) = spawned {
        tracing::warn!(ask = ask_id, %error, "cannot start a thread to spill for another process");
        bus.send_oneway(wire::bus_request::Body::SpillAnswer(wire::SpillAnswer {
            ask_id,
            bytes_freed: 0,
            error: None,
        }));
    }
}

/// Where other nodes reach this process's node, to pull its objects ("" outside a cluster).
static NODE_ADDRESS: parking_lot::Mutex<String> = parking_lot::Mutex::new(String::new());

/// Where other nodes reach this process's node ("" without shared memory).
pub fn node_address() -> String {
    NODE_ADDRESS.lock().clone()
}

/// Map the node's shared memory and make it this process's (blocks; call from a user thread).
/// A node without shared memory leaves every value inline.
pub fn connect(channel: DataChannel) -> Result<()> {
    let info = channel.call(client, |mut client| async move {
        client.pool_info(pb::PoolInfoRequest {}).await
    })?;
    if info.capacity == 0 {
        // `--shared-memory-mb 0`: every value stays in its process.
        shared_memory::install(None);
        NODE_ADDRESS.lock().clear();
        return Ok(());
    }
    *NODE_ADDRESS.lock() = info.node_address.clone();
    let disk = disk_runtime()?;
    let disk_channel = DataChannel::new(disk.handle().clone(), channel.address().to_string());
    crate::remote_value::set_puller(Some(Arc::new(NodePuller {
        channel: channel.clone(),
        disk: disk_channel.clone(),
    })));
    let memory = SharedMemory::map(
        &info.path,
        info.capacity,
        info.pool_id,
        Box::new(NodeAllocator {
            channel: channel.clone(),
            disk: disk_channel,
            _disk_runtime: DiskRuntime(Some(disk)),
        }),
    )?;
    tracing::debug!(
        pool = memory.pool_id(),
        capacity = info.capacity,
        "shared memory mapped"
    );
    shared_memory::install(Some(Arc::new(memory)));
    Ok(())
}

/// The id of this process's shared-memory pool, or "" without one.
pub fn pool_id() -> String {
    shared_memory::current()
        .map(|memory| memory.pool_id().to_string())
        .unwrap_or_default()
}

/// Pulls results held on other nodes for this process into this node (see
/// `crate::remote_value`), on the channel of spill and restore calls: a read may happen on the
/// IO thread, which must not wait for itself.
struct NodePuller {
    channel: DataChannel,
    disk: DataChannel,
}

impl crate::remote_value::RemotePuller for NodePuller {
    fn pull(&self, location: &wire::SharedLocation) -> Result<Payload> {
        let memory = mapped(location)?;
        let request = pull_request(location, true);
        let reply = self.disk.call(client, move |mut client| async move {
            client.pull_object(request).await
        })?;
        check(reply.error)?;
        Ok(Payload::Shared(memory.adopt(
            reply.allocation,
            reply.offset,
            reply.size,
            reply.capability,
        )?))
    }

    fn drop_hold(&self, location: &wire::SharedLocation) {
        let channel = self.channel.clone();
        let request = pb::DropRemoteRequest {
            node_address: location.node_address.clone(),
            allocation: location.allocation,
            size: location.size,
            capability: location.capability.clone(),
        };
        self.channel.io().spawn(async move {
            if let Ok(connected) = channel.connected().await {
                if let Err(status) = client(connected).drop_remote(request).await {
                    tracing::debug!(error = %status.message(), "the drop of a result held on another node failed");
                }
            }
        });
    }
}

/// This process's shared memory, for a value at `location`.
fn mapped(location: &wire::SharedLocation) -> Result<Arc<SharedMemory>> {
    shared_memory::current().ok_or_else(|| {
        Error::new(
            yr_common::ErrorCode::DatasystemFailed,
            format!(
                "a value in shared memory pool {} arrived, but this process maps no shared memory",
                location.pool_id
            ),
        )
    })
}

/// The pull of the value at `location` into this node; `release_source`: the holding node
/// drops the hold it keeps for this process afterwards.
fn pull_request(location: &wire::SharedLocation, release_source: bool) -> pb::PullObjectRequest {
    pb::PullObjectRequest {
        node_address: location.node_address.clone(),
        pool_id: location.pool_id.clone(),
        allocation: location.allocation,
        size: location.size,
        pid: std::process::id(),
        capability: location.capability.clone(),
        release_source,
    }
}

/// Take a reference to a region another process sent, and read it in place: in this node's
/// memory directly, in another node's after this node pulled a copy.
pub async fn open_location(
    channel: &DataChannel,
    location: &wire::SharedLocation,
) -> Result<Payload> {
    let memory = mapped(location)?;
    let connected = channel.connected().await?;
    let (allocation, offset, size, capability) = if memory.pool_id() == location.pool_id {
        let reply = client(connected)
            .retain(pb::RetainObjectRequest {
                allocation: location.allocation,
                pid: std::process::id(),
                for_receiver: false,
                for_remote_owner: false,
            })
            .await
            .map_err(|status| channel.failed(&status))?
            .into_inner();
        check(reply.error)?;
        (
            location.allocation,
            reply.offset,
            reply.size,
            reply.capability,
        )
    } else if !location.node_address.is_empty() {
        let reply = client(connected)
            .pull_object(pull_request(location, false))
            .await
            .map_err(|status| channel.failed(&status))?
            .into_inner();
        check(reply.error)?;
        (reply.allocation, reply.offset, reply.size, reply.capability)
    } else {
        return Err(Error::new(
            yr_common::ErrorCode::DatasystemFailed,
            format!(
                "a value in shared memory pool {} arrived without the address of its node",
                location.pool_id
            ),
        ));
    };
    Ok(Payload::Shared(
        memory.adopt(allocation, offset, size, capability)?,
    ))
}

/// Read in place a region of this node's shared memory that another process handed over to
/// this one (a call's result): the reference is already this process's, so nothing is asked of
/// the node, and dropping the payload gives it back.
pub fn adopt_handed_over(location: &wire::SharedLocation) -> Result<Payload> {
    match shared_memory::current() {
        Some(memory) if memory.pool_id() == location.pool_id => Ok(Payload::Shared(memory.adopt(
            location.allocation,
            location.offset,
            location.size,
            location.capability.clone(),
        )?)),
        _ => Err(Error::new(
            yr_common::ErrorCode::DatasystemFailed,
            format!(
                "a result was handed over in shared memory pool {}, which this process does \
                 not map",
                location.pool_id
            ),
        )),
    }
}
