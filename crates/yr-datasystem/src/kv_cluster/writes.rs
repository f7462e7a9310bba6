//! Writes and deletes at a key's owner: an NX write asks the key's previous owners whether it
//! exists, and a delete also deletes there and leaves a tombstone while keys move.

use std::collections::HashMap;
use std::sync::Arc;

use yr_common::{Error, ErrorCode, Result};
use yr_datasystem_core::kv;
use yr_datasystem_core::wire::set_param_from_proto;
use yr_proto::ds as pb;

use super::routing::{answer_of, check, route_of, transport_error};
use super::KvCluster;
use crate::kv_ring::Member;
use crate::service::blocking;

impl KvCluster {
    /// A write, at the key's owner.
    pub async fn set(self: &Arc<Self>, request: pb::KvSetRequest) -> Result<()> {
        self.first_view().await;
        let route = route_of(request.route);
        let param = set_param_from_proto(&request.param.unwrap_or_default())?;
        kv::validate_set(&request.key, request.value.len(), &param)?;
        let request = Arc::new(request);
        self.fan_out(
            std::slice::from_ref(&request.key),
            route,
            |_| {
                let request = request.clone();
                async move {
                    self.set_here(&request, &param).await?;
                    Ok(vec![()])
                }
            },
            |mut client, member, _, next| {
                let mut forwarded = (*request).clone();
                forwarded.route = next as i32;
                async move {
                    let reply = client
                        .kv_set(forwarded)
                        .await
                        .map_err(|status| transport_error(&member, &status))?;
                    check(reply.into_inner().error).map(|()| vec![()])
                }
            },
        )
        .await
        .map(|_| ())
    }

    async fn set_here(
        self: &Arc<Self>,
        request: &pb::KvSetRequest,
        param: &kv::SetParam,
    ) -> Result<()> {
        let view = self.view();
        if param.existence == kv::Existence::NX {
            for owner in self.previous_owners(&view, &request.key) {
                let exists = self.exist_at(&owner, vec![request.key.clone()]).await;
                if exists.is_ok_and(|e| e.first().copied().unwrap_or(false)) {
                    return Err(Error::new(
                        ErrorCode::KeyAlreadyExist,
                        format!(
                            "KV key {:?} already exists and the write was NX (only if absent); \
                             use another key, or write without NX to replace it",
                            request.key
                        ),
                    ));
                }
            }
        }
        self.tombstones.lock().remove(&request.key);
        let (kv, job, key, value, param) = (
            self.kv.clone(),
            request.job_id.clone(),
            request.key.clone(),
            request.value.clone(),
            *param,
        );
        blocking(move || kv.set_for_job(&job, &key, value, &param)).await?;
        self.note_stray(&view, &request.key);
        Ok(())
    }

    /// Delete `keys` at their owners (and at their previous owners while keys move).
    pub async fn del(self: &Arc<Self>, keys: Vec<String>, route: pb::KvRoute) -> Result<()> {
        kv::validate_keys(&keys)?;
        self.first_view().await;
        self.fan_out(
            &keys,
            route,
            |keys| async move {
                self.del_here(keys, route).await?;
                Ok(Vec::<()>::new())
            },
            |mut client, member, keys, next| async move {
                let reply = client
                    .kv_del(pb::KvDelRequest {
                        keys,
                        route: next as i32,
                    })
                    .await
                    .map_err(|status| transport_error(&member, &status))?;
                check(reply.into_inner().error).map(|()| Vec::new())
            },
        )
        .await
        .map(|_| ())
    }

    async fn del_here(self: &Arc<Self>, keys: Vec<String>, route: pb::KvRoute) -> Result<()> {
        let view = self.view();
        let mut previous: HashMap<Member, Vec<String>> = HashMap::new();
        if route != pb::KvRoute::Local {
            for key in &keys {
                for owner in self.previous_owners(&view, key) {
                    previous.entry(owner).or_default().push(key.clone());
                }
            }
        }
        if !view.previous.is_empty() {
            self.remember_deleted(&keys);
        }
        let kv = self.kv.clone();
        blocking(move || kv.del(&keys)).await?;
        for (owner, keys) in previous {
            let result = async {
                let mut client = self.client(&owner)?;
                let reply = answer_of(
                    &owner,
                    client.kv_del(pb::KvDelRequest {
                        keys,
                        route: pb::KvRoute::Local as i32,
                    }),
                )
                .await?;
                check(reply.error)
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, node = %owner.node_id, "cannot delete KV keys at their previous owner");
            }
        }
        Ok(())
    }
}
