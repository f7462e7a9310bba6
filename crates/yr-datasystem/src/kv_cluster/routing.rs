//! Routing of KV requests to the keys' owners: which node serves a key under a route, which
//! other nodes may hold it while keys move, the channels to other nodes' data workers, and the
//! fan-out of a request's keys to their owners, routed again when an owner cannot be reached.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tonic::transport::Channel;
use yr_common::{Error, ErrorCode, Result};
use yr_proto::ds as pb;
use yr_proto::ds::data_worker_client::DataWorkerClient;
use yr_proto::error_from_proto;

use super::{KvCluster, Target, View, MAX_REROUTES, REROUTE_WAIT};
use crate::kv_ring::Member;

/// How long connecting to another node's data worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) fn is_transport(error: &Error) -> bool {
    error.code() == ErrorCode::InnerCommunication
}

pub(super) fn transport_error(member: &Member, status: &tonic::Status) -> Error {
    Error::new(
        ErrorCode::InnerCommunication,
        format!(
            "cannot reach the data worker of node {} at {}, which owns the KV keys asked for: \
             {}; the keys move to another node once the master declares it lost",
            member.node_id,
            member.address,
            status.message()
        ),
    )
}

/// The error of a call to `member`'s data worker that got no answer within [`REROUTE_WAIT`].
pub(super) fn no_answer(member: &Member) -> Error {
    transport_error(member, &tonic::Status::deadline_exceeded("no answer"))
}

/// The reply of `call` to `member`'s data worker, awaited for up to [`REROUTE_WAIT`]; no answer
/// or a failed call is a transport error naming the member.
pub(super) async fn answer_of<T>(
    member: &Member,
    call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    let reply = tokio::time::timeout(REROUTE_WAIT, call)
        .await
        .map_err(|_| no_answer(member))?
        .map_err(|status| transport_error(member, &status))?;
    Ok(reply.into_inner())
}

pub(super) fn check(error: Option<yr_proto::v1::ErrorInfo>) -> Result<()> {
    match error {
        Some(error) => Err(error_from_proto(&error)),
        None => Ok(()),
    }
}

pub(super) fn route_of(value: i32) -> pb::KvRoute {
    pb::KvRoute::try_from(value).unwrap_or(pb::KvRoute::Client)
}

impl KvCluster {
    fn target(&self, view: &View, key: &str, route: pb::KvRoute) -> Target {
        match route {
            pb::KvRoute::Final | pb::KvRoute::Local => Target::Here,
            pb::KvRoute::Client | pb::KvRoute::Owner => match view.ring.owner(key) {
                Some(owner) if owner.node_id != self.node_id => Target::Node(owner.clone()),
                _ => Target::Here,
            },
        }
    }

    /// The route of a request forwarded from a request that arrived with `route`.
    pub(super) fn next_route(route: pb::KvRoute) -> pb::KvRoute {
        match route {
            pb::KvRoute::Client => pb::KvRoute::Owner,
            _ => pb::KvRoute::Final,
        }
    }

    /// The other nodes that may hold `key` while keys move: its owners under the previous
    /// rings, and its owner under this ring when that is not this node (a request served here
    /// because another node's ring still named this one); not lost, still on the ring.
    pub(super) fn previous_owners(&self, view: &View, key: &str) -> Vec<Member> {
        let mut owners: Vec<Member> = Vec::new();
        for ring in std::iter::once(&view.ring).chain(&view.previous) {
            if let Some(owner) = ring.owner(key) {
                if owner.node_id != self.node_id
                    && !view.lost.contains(&owner.node_id)
                    && view.ring.contains(&owner.node_id)
                    && !owners.contains(owner)
                {
                    owners.push(owner.clone());
                }
            }
        }
        owners
    }

    /// Split `keys` (with their indexes) by target.
    pub(super) fn groups<'a>(
        &self,
        view: &View,
        keys: impl IntoIterator<Item = (usize, &'a String)>,
        route: pb::KvRoute,
    ) -> HashMap<Target, Vec<(usize, String)>> {
        let mut groups: HashMap<Target, Vec<(usize, String)>> = HashMap::new();
        for (index, key) in keys {
            groups
                .entry(self.target(view, key, route))
                .or_default()
                .push((index, key.clone()));
        }
        groups
    }

    pub(crate) fn client(&self, member: &Member) -> Result<DataWorkerClient<Channel>> {
        let channel = {
            let mut channels = self.channels.lock();
            match channels.get(&member.address) {
                Some(channel) => channel.clone(),
                None => {
                    let channel = yr_transport::connect_lazy_with(
                        &member.address,
                        ErrorCode::InnerCommunication,
                        |endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT),
                    )?;
                    channels.insert(member.address.clone(), channel.clone());
                    channel
                }
            }
        };
        Ok(DataWorkerClient::new(channel)
            .max_decoding_message_size(yr_transport::max_message_bytes())
            .max_encoding_message_size(yr_transport::max_message_bytes()))
    }

    /// Run `call` on its keys' owners: `here` for keys this node serves, `there` forwarded to
    /// another node with the next route; a forward that cannot reach its owner is routed again
    /// once the ring changes (within [`REROUTE_WAIT`]).
    pub(super) async fn fan_out<T, H, HF, F, FF>(
        self: &Arc<Self>,
        keys: &[String],
        route: pb::KvRoute,
        here: H,
        there: F,
    ) -> Result<Vec<T>>
    where
        T: Default + Clone,
        H: Fn(Vec<String>) -> HF,
        HF: std::future::Future<Output = Result<Vec<T>>>,
        F: Fn(DataWorkerClient<Channel>, Member, Vec<String>, pb::KvRoute) -> FF,
        FF: std::future::Future<Output = Result<Vec<T>>>,
    {
        let mut out = vec![T::default(); keys.len()];
        let mut pending: Vec<(usize, String)> = keys.iter().cloned().enumerate().collect();
        for attempt in 0..=MAX_REROUTES {
            let view = self.view();
            let groups = self.groups(&view, pending.iter().map(|(i, k)| (*i, k)), route);
            let calls = groups.into_iter().map(|(target, group)| {
                let names: Vec<String> = group.iter().map(|(_, k)| k.clone()).collect();
                let here = &here;
                let there = &there;
                async move {
                    let result = match &target {
                        Target::Here => here(names).await,
                        Target::Node(member) => match self.client(member) {
                            Ok(client) => {
                                there(client, member.clone(), names, Self::next_route(route)).await
                            }
                            Err(error) => Err(error),
                        },
                    };
                    (group, result)
                }
            });
            let mut retry = Vec::new();
            let mut last_error = None;
            for (group, result) in join_all(calls).await {
                match result {
                    Ok(values) => {
                        for ((index, _), value) in group.into_iter().zip(values) {
                            out[index] = value;
                        }
                    }
                    Err(error) if is_transport(&error) && attempt < MAX_REROUTES => {
                        last_error = Some(error);
                        retry.extend(group);
                    }
                    Err(error) => return Err(error),
                }
            }
            if retry.is_empty() {
                return Ok(out);
            }
            let deadline = tokio::time::Instant::now() + REROUTE_WAIT;
            if !self.ring_changed(view.epoch, Some(deadline)).await {
                return Err(last_error.unwrap_or_else(|| {
                    Error::new(ErrorCode::InnerCommunication, "a KV owner is unreachable")
                }));
            }
            pending = retry;
        }
        Ok(out)
    }
}
