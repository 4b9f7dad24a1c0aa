//! Prometheus metrics (`--metrics`, default `127.0.0.1:9090/metrics`). Everything is counted
//! once per connection or per decision, never per byte read: byte totals are added when a
//! connection closes.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";

pub const EGRESS: &str = "egress";
pub const INGRESS: &str = "ingress";

/// One tunneled connection: its direction, the Import (egress) or Export (ingress) it serves
/// as `namespace/name`, and the remote peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub service: String,
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailLabels {
    pub direction: &'static str,
    pub service: String,
    pub peer: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub service: String,
    pub peer: String,
    /// `sent` towards the remote side or `received` from it.
    pub flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub direction: &'static str,
    pub action: &'static str,
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathLabels {
    pub datapath: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DemotionLabels {
    /// `bulk`, `sender-outran`, or `gave-up` (the redirect queues did not empty in time).
    pub reason: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

type Latency = Family<DirectionLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub failed: Family<FailLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
    pub handshake: Latency,
    pub setup: Latency,
    pub peer_reachable: Family<PeerLabels, Gauge>,
    pub datapath: Family<DatapathLabels, Gauge>,
    pub demotions: Family<DemotionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("clink");
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            bytes: Family::default(),
            active: Family::default(),
            decisions: Family::default(),
            handshake: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            setup: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            peer_reachable: Family::default(),
            datapath: Family::default(),
            demotions: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections_opened",
            "Tunneled connections that were opened",
            m.opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Tunneled connections that ended after carrying data",
            m.closed.clone(),
        );
        registry.register(
            "connections_failed",
            "Connections that could not be tunneled, by reason",
            m.failed.clone(),
        );
        registry.register(
            "bytes",
            "Payload bytes carried by closed connections",
            m.bytes.clone(),
        );
        registry.register(
            "active_connections",
            "Tunneled connections open now",
            m.active.clone(),
        );
        registry.register(
            "policy_decisions",
            "Access policy decisions by action and tier",
            m.decisions.clone(),
        );
        registry.register(
            "tls_handshake_seconds",
            "TLS handshake time with peers",
            m.handshake.clone(),
        );
        registry.register(
            "connection_setup_seconds",
            "Time from accepting a connection to its tunnel being open",
            m.setup.clone(),
        );
        registry.register(
            "peer_reachable",
            "1 while the peer answers heartbeats",
            m.peer_reachable.clone(),
        );
        registry.register(
            "datapath",
            "The data path in use (value 1)",
            m.datapath.clone(),
        );
        registry.register(
            "sockmap_demotions",
            "Connections taken off the sockmap splice to plain TCP, by reason (gave-up: an \
             attempt that found the redirect queues not emptying in time)",
            m.demotions.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn observe(latency: &Latency, direction: &'static str, d: Duration) {
        latency
            .get_or_create(&DirectionLabels { direction })
            .observe(d.as_secs_f64());
    }
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let mut resp = if req.uri().path() == "/metrics" {
                        let mut r = hyper::Response::new(Full::new(Bytes::from(metrics.encode())));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    } else {
                        hyper::Response::new(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    if req.uri().path() != "/metrics" {
                        *resp.status_mut() = StatusCode::NOT_FOUND;
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_families_with_labels() {
        let m = Metrics::default();
        let labels = ConnLabels {
            direction: EGRESS,
            service: "default/iperf3".into(),
            peer: "peer-b".into(),
        };
        m.opened.get_or_create(&labels).inc();
        m.decisions
            .get_or_create(&DecisionLabels {
                direction: EGRESS,
                action: "allow",
                tier: "namespaced",
            })
            .inc();
        Metrics::observe(&m.setup, EGRESS, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains(
                "clink_connections_opened_total{direction=\"egress\",service=\"default/iperf3\",peer=\"peer-b\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "clink_policy_decisions_total{direction=\"egress\",action=\"allow\",tier=\"namespaced\"} 1"
        ));
        assert!(text.contains("clink_connection_setup_seconds_count{direction=\"egress\"} 1"));
    }
}
