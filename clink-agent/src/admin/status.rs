//! `GET /v1/status`: everything it reports is read from the agent here, and only here.

use std::{collections::BTreeMap, time::Duration};

use super::types::{ImportPort, PeerState, StatusResponse};
use crate::{
    agent::Agent,
    api::{Kind, PEER_REACHABLE},
};

/// The agent's status; `uptime` is how long the admin API has been serving.
pub(super) async fn collect(agent: &Agent, uptime: Duration) -> StatusResponse {
    let snapshot = agent.snapshot();
    let mut objects: BTreeMap<String, usize> = Kind::ALL
        .into_iter()
        .map(|kind| (kind.as_str().to_owned(), 0))
        .collect();
    for key in snapshot.objects.keys() {
        *objects.entry(key.kind.as_str().to_owned()).or_default() += 1;
    }
    let imports = agent
        .import_ports()
        .await
        .into_iter()
        .map(|(key, port)| ImportPort {
            import: key.to_string(),
            port,
        })
        .collect();
    let mut peers: Vec<PeerState> = snapshot
        .peers
        .iter()
        .map(|(name, peer)| PeerState {
            name: name.clone(),
            reachable: peer
                .status
                .condition(PEER_REACHABLE)
                .map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
            labels: peer.status.labels.clone(),
        })
        .collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    StatusResponse {
        name: agent.name().to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        gateway: agent.gateway(),
        datapath: agent.datapath().name().to_owned(),
        labels: agent.labels().clone(),
        uptime_seconds: uptime.as_secs(),
        objects,
        imports,
        peers,
        connections: agent.metrics().connection_totals(),
        paths: agent.context().connections.per_path(),
        objects_from: agent
            .external_source()
            .unwrap_or("state directory")
            .to_owned(),
        leader: agent
            .external_source()
            .map(|_| agent.metrics().kubernetes_leader.get() == 1),
        certificate: agent.context().credentials.cert(),
    }
}
