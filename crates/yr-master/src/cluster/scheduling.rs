//! Scheduling on the cluster: placing a request on a live node from the resource view and
//! reserving it there tentatively, so concurrent schedules spread.
//!
//! A placement reads the view's nodes most free CPU first and takes the first that fits: it
//! costs the nodes it passes over (excluded, lacking a label or an affinity, or short of
//! memory or a custom resource), not the fleet, and it holds the cluster lock that briefly. When
//! no node fits, it scores every node to say why, as [`placement::place`] does.

use std::sync::atomic::Ordering;

use yr_common::ErrorCode;
use yr_proto::error_to_proto;
use yr_proto::v1::{ScheduleRequest, ScheduleResponse};

use super::{Cluster, Nodes};
use crate::placement::{self, Candidate, PlacementError, PlacementRequest};
use crate::registry::{NodeState, Registry};
use crate::resource_view::{NodeResources, ResourceSet};

impl Cluster {
    /// Places a request on a live node and reserves it there tentatively.
    pub fn schedule(&self, request: &ScheduleRequest) -> ScheduleResponse {
        self.counters
            .schedule_requests
            .fetch_add(1, Ordering::Relaxed);
        match self.place(request) {
            Ok((node_id, node_address)) => ScheduleResponse {
                node_id,
                node_address,
                error: None,
            },
            Err(err) => {
                let counter = match err.code() {
                    ErrorCode::ResourceConfigError => &self.counters.schedule_config_error,
                    _ => &self.counters.schedule_not_enough,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %err, "schedule request not placed");
                let error = err.to_error();
                ScheduleResponse {
                    node_id: String::new(),
                    node_address: String::new(),
                    error: Some(error_to_proto(&error)),
                }
            }
        }
    }

    /// Places an instance of `options`' resources and required label affinities (as a node
    /// asks for it) on a live node, and reserves it there tentatively.
    pub(super) fn place_instance(
        &self,
        options: &yr_common::InvokeOptions,
    ) -> Result<(String, String), PlacementError> {
        use yr_common::{AffinityKind, AffinityType};
        let request = ScheduleRequest {
            request: Some(yr_proto::v1::Resources {
                cpu_millicores: u64::from(options.cpu),
                memory_mb: u64::from(options.memory),
                custom: options
                    .custom_resources
                    .iter()
                    .map(|(name, amount)| (name.clone(), *amount))
                    .collect(),
            }),
            exclude_nodes: Vec::new(),
            labels: Vec::new(),
            required_affinities: Vec::new(),
        };
        // The affinities a node asks the master to honour (`create_options::required_affinities`
        // in the proxy): every one of kind RESOURCE, anti or not.
        let affinities: Vec<yr_common::Affinity> = options
            .schedule_affinities
            .iter()
            .filter(|affinity| affinity.affinity_kind == AffinityKind::Resource)
            .map(|affinity| {
                let anti = matches!(
                    affinity.affinity_type,
                    AffinityType::RequiredAnti | AffinityType::PreferredAnti
                );
                yr_common::Affinity {
                    affinity_type: if anti {
                        AffinityType::RequiredAnti
                    } else {
                        AffinityType::Required
                    },
                    ..affinity.clone()
                }
            })
            .collect();
        self.place_with(&request, &affinities)
    }

    fn place(&self, request: &ScheduleRequest) -> Result<(String, String), PlacementError> {
        let affinities: Vec<yr_common::Affinity> = request
            .required_affinities
            .iter()
            .map(placement::affinity_from_proto)
            .collect();
        self.place_with(request, &affinities)
    }

    fn place_with(
        &self,
        request: &ScheduleRequest,
        affinities: &[yr_common::Affinity],
    ) -> Result<(String, String), PlacementError> {
        let resources = ResourceSet::from_proto(&request.request.clone().unwrap_or_default());
        let request = PlacementRequest {
            resources: &resources,
            exclude_nodes: &request.exclude_nodes,
            labels: &request.labels,
            affinities,
        };
        let now = self.clock.now();
        let mut nodes = self.nodes.lock();
        nodes.view.expire_reservations(now, self.node_timeout);
        let Nodes { registry, view } = &mut *nodes;
        // The view keeps the nodes most free CPU first: the first that fits is the choice, and
        // usually one of the first few. Only when none fits are all nodes scored, for the reason.
        let fit = placement::first_fit(
            view.by_free_cpu()
                .filter_map(|(node_id, resources)| alive(registry, node_id, resources)),
            &request,
        )
        .map(str::to_string);
        let chosen = match fit {
            Some(node_id) => node_id,
            None => {
                let candidates: Vec<Candidate<'_>> = view
                    .iter()
                    .filter_map(|(node_id, resources)| alive(registry, node_id, resources))
                    .collect();
                placement::place(&candidates, &request)?.to_string()
            }
        };
        view.reserve(&chosen, &resources, now);
        let address = registry
            .get(&chosen)
            .map(|entry| entry.info.address.clone())
            .unwrap_or_default();
        Ok((chosen, address))
    }
}

/// A node of the view as placement sees it, when the registry holds it alive.
fn alive<'a>(
    registry: &'a Registry,
    node_id: &str,
    resources: &'a NodeResources,
) -> Option<Candidate<'a>> {
    registry
        .get(node_id)
        .filter(|entry| entry.state == NodeState::Alive)
        .map(|entry| Candidate {
            node_id: &entry.info.node_id,
            capacity: resources.capacity(),
            allocatable: resources.allocatable(),
            labels: &entry.info.labels,
        })
}
