//! Reads at a key's owner: gets, which may wait there and are sent again to the new owner when
//! the ring changes under them, and existence checks; both ask the keys' previous owners while
//! keys move, and a get that misses names the lost nodes that owned the missing keys.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::sync::Notify;
use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::kv;
use yr_datasystem_core::wire::timeout_to_ms;
use yr_proto::ds as pb;

use super::routing::{answer_of, check, is_transport, no_answer, transport_error};
use super::{KvCluster, Target, View, MAX_REROUTES, REROUTE_WAIT};
use crate::kv_ring::Member;
use crate::service::blocking;

impl KvCluster {
    /// The values of `keys`, waiting up to `timeout`, at their owners: for a client, every value
    /// or 4005 naming the missing keys; for another node, what was found.
    pub async fn get(
        self: &Arc<Self>,
        keys: Vec<String>,
        timeout: Duration,
        route: pb::KvRoute,
    ) -> Result<Vec<Option<Bytes>>> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        if route == pb::KvRoute::Local {
            let kv = self.kv.clone();
            return blocking(move || kv.try_get(&keys)).await;
        }
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut values: Vec<Option<Bytes>> = vec![None; keys.len()];
        let mut unreachable: Option<Error> = None;
        let mut late_rounds = 0;
        loop {
            let missing: Vec<(usize, &String)> = keys
                .iter()
                .enumerate()
                .filter(|(i, _)| values[*i].is_none())
                .collect();
            if missing.is_empty() {
                break;
            }
            let view = self.view();
            let groups = self.groups(&view, missing, route);
            let rounds = groups.into_iter().map(|(target, group)| {
                let view = view.clone();
                async move {
                    let names: Vec<String> = group.iter().map(|(_, k)| k.clone()).collect();
                    let found = match &target {
                        Target::Here => self.get_here(&view, names, deadline).await,
                        Target::Node(member) => {
                            self.get_at(
                                member,
                                names,
                                deadline,
                                Self::next_route(route),
                                view.epoch,
                            )
                            .await
                        }
                    };
                    (group, found)
                }
            });
            let mut failed = false;
            for (group, found) in join_all(rounds).await {
                match found {
                    Ok(found) => {
                        for ((index, _), value) in group.into_iter().zip(found) {
                            if value.is_some() {
                                values[index] = value;
                            }
                        }
                    }
                    Err(error) if is_transport(&error) => {
                        failed = true;
                        unreachable = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            if values.iter().all(Option::is_some) {
                break;
            }
            // A part that came back early because the ring changed is asked again at its new
            // owner, also past the deadline (a read with no timeout during a move).
            let rerouted = self.view().epoch != view.epoch;
            let expired = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            if expired && !(rerouted && late_rounds < MAX_REROUTES) {
                break;
            }
            if expired {
                late_rounds += 1;
                continue;
            }
            if failed {
                // The owner died or is cut off: route again once the ring changes.
                if !self.ring_changed(view.epoch, deadline).await {
                    break;
                }
            }
            // Otherwise a part came back early because a ring changed: route again.
        }
        if route != pb::KvRoute::Client || values.iter().all(Option::is_some) {
            return Ok(values);
        }
        let missing = crate::service::missing_keys(&keys, &values);
        if let Some(error) = unreachable {
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(error);
            }
        }
        Err(self.missing_error(&missing, timeout))
    }

    /// 4005 naming `missing`, saying which of them belonged to a node that was lost.
    fn missing_error(&self, missing: &[&str], timeout: Duration) -> Error {
        let error = kv::timeout_error(missing, timeout);
        let view = self.view();
        let mut lost: Vec<String> = Vec::new();
        for key in missing {
            for ring in &view.previous {
                if let Some(owner) = ring.owner(key) {
                    if view.lost.contains(&owner.node_id) && !lost.contains(&owner.node_id) {
                        lost.push(owner.node_id.clone());
                    }
                }
            }
        }
        if lost.is_empty() {
            return error;
        }
        Error::new(
            error.code(),
            format!(
                "{}. Some of these keys were owned by node(s) {} that the master declared lost: \
                 their values were in that node's memory only (write them with \
                 WriteThroughL2Cache and a shared Redis second-level store to keep them over a \
                 node's loss)",
                error.message(),
                lost.join(", ")
            ),
        )
    }

    /// Keys this node owns: what is here, else at their previous owners, waiting here (woken
    /// by writes and by keys moved in) until `deadline` or until the ring changes.
    async fn get_here(
        self: &Arc<Self>,
        view: &View,
        keys: Vec<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<Option<Bytes>>> {
        let notify = Arc::new(Notify::new());
        let waker = {
            let notify = notify.clone();
            Arc::new(move || notify.notify_one())
        };
        // Watch before the first look, so that a write in between is not missed.
        let _watch = self.kv.watch(&keys, waker);
        let keys = Arc::new(keys);
        let mut asked_previous = false;
        let mut changes = self.view.subscribe();
        loop {
            let mut values = {
                let (kv, keys) = (self.kv.clone(), keys.clone());
                blocking(move || kv.try_get(&keys)).await?
            };
            if !asked_previous && values.iter().any(Option::is_none) {
                asked_previous = true;
                self.fill_from_previous(view, &keys, &mut values).await;
            }
            if values.iter().all(Option::is_some) {
                return Ok(values);
            }
            let wait = async {
                tokio::select! {
                    () = notify.notified() => true,
                    _ = async { changes.wait_for(|v| v.epoch != view.epoch).await.is_ok() } => {
                        // The entry node routes again under the new ring.
                        false
                    }
                }
            };
            let woken = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, wait)
                    .await
                    .unwrap_or(false),
                None => wait.await,
            };
            if !woken {
                let (kv, keys) = (self.kv.clone(), keys.clone());
                let mut last = blocking(move || kv.try_get(&keys)).await?;
                for (value, old) in last.iter_mut().zip(values) {
                    if value.is_none() {
                        *value = old;
                    }
                }
                return Ok(last);
            }
        }
    }

    /// Fill the missing `values` of `keys` from the keys' previous owners (moves in flight).
    async fn fill_from_previous(
        self: &Arc<Self>,
        view: &View,
        keys: &[String],
        values: &mut [Option<Bytes>],
    ) {
        let mut asks: HashMap<Member, Vec<usize>> = HashMap::new();
        for (index, key) in keys.iter().enumerate() {
            if values[index].is_none() {
                for owner in self.previous_owners(view, key) {
                    asks.entry(owner).or_default().push(index);
                }
            }
        }
        for (owner, indexes) in asks {
            let names: Vec<String> = indexes.iter().map(|i| keys[*i].clone()).collect();
            match self
                .get_at(&owner, names, None, pb::KvRoute::Local, view.epoch)
                .await
            {
                Ok(found) => {
                    for (index, value) in indexes.into_iter().zip(found) {
                        if values[index].is_none() {
                            values[index] = value;
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, node = %owner.node_id, "a previous KV owner did not answer")
                }
            }
        }
    }

    /// Ask node `member` for `keys` with `route`, waiting there until `deadline`; a ring change
    /// here (after `epoch`) ends the wait with what was found so far (nothing).
    async fn get_at(
        self: &Arc<Self>,
        member: &Member,
        keys: Vec<String>,
        deadline: Option<tokio::time::Instant>,
        route: pb::KvRoute,
        epoch: u64,
    ) -> Result<Vec<Option<Bytes>>> {
        let count = keys.len();
        let timeout_ms = match deadline {
            Some(deadline) => {
                timeout_to_ms(deadline.saturating_duration_since(tokio::time::Instant::now()))
            }
            None if route == pb::KvRoute::Local => 0,
            None => u64::MAX,
        };
        let mut client = self.client(member)?;
        // A waiting read forwarded for a client counts here too, where the client waits on it.
        let _waiting =
            (timeout_ms > 0 && route != pb::KvRoute::Local).then(|| self.kv.forwarded_read());
        let request = pb::KvGetRequest {
            keys,
            timeout_ms,
            route: route as i32,
        };
        let call = client.kv_get(request);
        let reply = if route == pb::KvRoute::Local {
            tokio::time::timeout(REROUTE_WAIT, call)
                .await
                .map_err(|_| no_answer(member))?
        } else {
            tokio::select! {
                reply = call => reply,
                _ = self.ring_changed(epoch, None) => return Ok(vec![None; count]),
            }
        };
        let reply = reply
            .map_err(|status| transport_error(member, &status))?
            .into_inner();
        check(reply.error)?;
        if reply.values.len() != count || reply.found.len() != count {
            return Err(Error::new(
                ErrorCode::InnerCommunication,
                format!(
                    "the data worker of node {} answered {} values for {count} KV keys",
                    member.node_id,
                    reply.values.len()
                ),
            ));
        }
        Ok(reply
            .values
            .into_iter()
            .zip(reply.found)
            .map(|(value, found)| found.then_some(value))
            .collect())
    }

    /// Whether each of `keys` has a value, at its owner (or its previous owners).
    pub async fn exist(
        self: &Arc<Self>,
        keys: Vec<String>,
        route: pb::KvRoute,
    ) -> Result<Vec<bool>> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        self.fan_out(
            &keys,
            route,
            |keys| async move {
                let local = {
                    let (kv, keys) = (self.kv.clone(), keys.clone());
                    blocking(move || kv.exist(&keys)).await?
                };
                if route == pb::KvRoute::Local || local.iter().all(|e| *e) {
                    return Ok(local);
                }
                let view = self.view();
                let mut out = local;
                let mut asks: HashMap<Member, Vec<usize>> = HashMap::new();
                for (index, key) in keys.iter().enumerate() {
                    if !out[index] {
                        for owner in self.previous_owners(&view, key) {
                            asks.entry(owner).or_default().push(index);
                        }
                    }
                }
                for (owner, indexes) in asks {
                    let names = indexes.iter().map(|i| keys[*i].clone()).collect();
                    if let Ok(found) = self.exist_at(&owner, names).await {
                        for (index, exists) in indexes.into_iter().zip(found) {
                            out[index] |= exists;
                        }
                    }
                }
                Ok(out)
            },
            |mut client, member, keys, next| async move {
                let count = keys.len();
                let reply = client
                    .kv_exist(pb::KvExistRequest {
                        keys,
                        route: next as i32,
                    })
                    .await
                    .map_err(|status| transport_error(&member, &status))?
                    .into_inner();
                check(reply.error)?;
                if reply.exists.len() != count {
                    return Err(Error::new(
                        ErrorCode::InnerCommunication,
                        format!(
                            "the data worker of node {} answered {} flags for {count} KV keys",
                            member.node_id,
                            reply.exists.len()
                        ),
                    ));
                }
                Ok(reply.exists)
            },
        )
        .await
    }

    /// What node `member` holds of `keys` now.
    pub(super) async fn exist_at(&self, member: &Member, keys: Vec<String>) -> Result<Vec<bool>> {
        let mut client = self.client(member)?;
        let reply = answer_of(
            member,
            client.kv_exist(pb::KvExistRequest {
                keys,
                route: pb::KvRoute::Local as i32,
            }),
        )
        .await?;
        check(reply.error)?;
        Ok(reply.exists)
    }
}
