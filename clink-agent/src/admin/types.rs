//! The admin API's contract: one type per answer, serialized by the agent and read by `clink`,
//! so a renamed field breaks the build instead of printing nothing. Field names are camelCase,
//! as in the Kubernetes API. Answers to `GET /v1/objects/...` are arrays of [`crate::api::Object`].

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// What happened to one applied object, as kubectl reports it.
pub use crate::agent::Change;
/// One open connection and the path its payload takes.
pub use crate::connections::{BytePath, ConnectionInfo};
/// Connection counters since the agent started, as `/metrics` has them.
pub use crate::metrics::ConnectionTotals as Connections;
/// A certificate's DNS name, serial and expiry.
pub use crate::tls::CertInfo;

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusResponse {
    /// The agent's peer name.
    pub name: String,
    pub version: String,
    pub gateway: SocketAddr,
    /// The data path the agent runs (`userspace`, `sockmap`, `ktls`); each connection's own
    /// path is in `paths` and `GET /v1/connections`.
    pub datapath: String,
    /// The labels this agent announces to its peers.
    pub labels: BTreeMap<String, String>,
    pub uptime_seconds: u64,
    /// Objects by kind (`Peer`, `Export`, ...), every kind listed.
    pub objects: BTreeMap<String, usize>,
    pub imports: Vec<ImportPort>,
    pub peers: Vec<PeerState>,
    pub connections: Connections,
    /// Open connections per path their payload takes (`setup` while being set up).
    pub paths: BTreeMap<BytePath, u64>,
    /// Where the objects come from: `state directory` (standalone) or `the Kubernetes API`.
    #[serde(default)]
    pub objects_from: String,
    /// Kubernetes mode: whether this agent holds the Lease (writes status and Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<bool>,
    /// The peer certificate new connections present (after the last reload); empty from an
    /// agent older than certificate reloading.
    #[serde(default)]
    pub certificate: CertInfo,
}

/// `GET /v1/connections`: the open tunneled connections, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsResponse {
    pub connections: Vec<ConnectionInfo>,
}

/// The port an Import is being served on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportPort {
    /// `Import <namespace>/<name>`.
    pub import: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerState {
    pub name: String,
    /// The `PeerReachable` condition's status: `True`, `False` or `Unknown`.
    pub reachable: String,
    /// The labels the peer announced in its heartbeat answers.
    pub labels: BTreeMap<String, String>,
}

/// `POST /v1/apply`: one result per applied object, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// `<Kind> <namespace>/<name>`.
    pub object: String,
    pub change: Change,
}

/// `DELETE /v1/objects/...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// `<Kind> <namespace>/<name>`.
    pub deleted: String,
}

/// Every 4xx/5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    /// One line, ready to show the operator.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::{json, Value};

    use super::*;

    fn status() -> StatusResponse {
        StatusResponse {
            name: "peer-a".to_owned(),
            version: "0.1.0".to_owned(),
            gateway: "10.0.0.1:443".parse().unwrap(),
            datapath: "userspace".to_owned(),
            labels: BTreeMap::from([("region".to_owned(), "eu".to_owned())]),
            uptime_seconds: 7,
            objects: BTreeMap::from([("Peer".to_owned(), 1), ("Import".to_owned(), 1)]),
            imports: vec![ImportPort {
                import: "Import default/db".to_owned(),
                port: 5432,
            }],
            peers: vec![PeerState {
                name: "peer-b".to_owned(),
                reachable: "True".to_owned(),
                labels: BTreeMap::new(),
            }],
            connections: Connections {
                active: 1,
                opened: 2,
                failed: 3,
                bytes_out: 4,
                bytes_in: 5,
            },
            paths: BTreeMap::from([(BytePath::Ktls, 1), (BytePath::Userspace, 0)]),
            objects_from: "the Kubernetes API".to_owned(),
            leader: Some(true),
            certificate: CertInfo {
                dns_name: "peer-a".to_owned(),
                serial: "1F2E".to_owned(),
                not_after: 1_900_000_000,
            },
        }
    }

    /// The value survives JSON, and its JSON is exactly `expected`.
    fn round_trip<T>(value: T, expected: Value)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let json = serde_json::to_value(&value).unwrap();
        assert_eq!(json, expected);
        let text = serde_json::to_string(&value).unwrap();
        assert_eq!(serde_json::from_str::<T>(&text).unwrap(), value);
    }

    #[test]
    fn status_is_camel_case() {
        round_trip(
            status(),
            json!({
                "name": "peer-a",
                "version": "0.1.0",
                "gateway": "10.0.0.1:443",
                "datapath": "userspace",
                "labels": {"region": "eu"},
                "uptimeSeconds": 7,
                "objects": {"Import": 1, "Peer": 1},
                "imports": [{"import": "Import default/db", "port": 5432}],
                "peers": [{"name": "peer-b", "reachable": "True", "labels": {}}],
                "connections": {"active": 1, "opened": 2, "failed": 3, "bytesOut": 4, "bytesIn": 5},
                "paths": {"userspace": 0, "ktls": 1},
                "objectsFrom": "the Kubernetes API",
                "leader": true,
                "certificate": {"dnsName": "peer-a", "serial": "1F2E", "notAfter": 1_900_000_000},
            }),
        );
    }

    #[test]
    fn apply_delete_and_error_answers() {
        round_trip(
            ApplyResponse {
                results: vec![
                    ApplyResult {
                        object: "Export default/db".to_owned(),
                        change: Change::Created,
                    },
                    ApplyResult {
                        object: "Peer default/b".to_owned(),
                        change: Change::Unchanged,
                    },
                ],
            },
            json!({"results": [
                {"object": "Export default/db", "change": "created"},
                {"object": "Peer default/b", "change": "unchanged"},
            ]}),
        );
        round_trip(
            DeleteResponse {
                deleted: "Import default/db".to_owned(),
            },
            json!({"deleted": "Import default/db"}),
        );
        round_trip(
            ErrorResponse {
                error: "Import default/x not found".to_owned(),
            },
            json!({"error": "Import default/x not found"}),
        );
        assert_eq!(Change::Configured.to_string(), "configured");
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_default() {
        let mut json = serde_json::to_value(status()).unwrap();
        json["connections"]
            .as_object_mut()
            .unwrap()
            .remove("bytesOut");
        let err = serde_json::from_value::<StatusResponse>(json).unwrap_err();
        assert!(err.to_string().contains("bytesOut"), "{err}");
    }
}
