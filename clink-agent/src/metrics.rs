//! Prometheus metrics (`--metrics`, default `127.0.0.1:9090/metrics`). Everything is counted
//! once per connection or per decision, never per byte read: byte totals are added when a
//! connection closes.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{service::service_fn, Request, StatusCode};
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

use crate::limits;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";

pub const EGRESS: &str = "egress";
pub const INGRESS: &str = "ingress";

/// The `peer` label of a remote side that is not a configured Peer (a fabric member we do not
/// know, a Peer named by an Import that does not exist).
pub const UNKNOWN_PEER: &str = "unknown";
/// The `service` label of a request for an Export that does not exist.
pub const UNKNOWN_SERVICE: &str = "unknown";

/// One tunneled connection: its direction, the Import (egress) or Export (ingress) it serves
/// as `namespace/name`, and the remote peer.
///
/// Label values come only from objects that exist, never from what a peer sent: a peer
/// chooses the names it asks for, and each distinct value would be a series of its own.
/// `service` is an existing Import or Export; `peer` a configured Peer, or [`UNKNOWN_PEER`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub direction: &'static str,
    pub service: String,
    pub peer: String,
}

/// A connection that could not be tunneled. As [`ConnLabels`]; `service` is also
/// [`UNKNOWN_SERVICE`] (the peer asked for an Export that does not exist) or empty (refused
/// before a service was looked up: not a Peer, malformed request; egress `no-source`), and
/// `peer` empty for egress `no-source`.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    pub direction: &'static str,
    /// `kernel`, `failed` (reset), or `fallback-<why>` (stayed in userspace).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KtlsBytesLabels {
    /// `spliced` (never in the agent's memory) or `copied` (read and written by the agent).
    pub moved: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub direction: &'static str,
    /// `userspace`, `sockmap` or `ktls` (see `dataplane::table::BytePath`).
    pub path: &'static str,
}

/// A connection refused at a cap (see `limits`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `gateway`, `import`, `metrics` or `admin`.
    pub listener: &'static str,
    /// `connections`, `import-connections`, `handshakes` or `http-connections`.
    pub limit: &'static str,
}

/// One of the caps of `limits`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// One resource the agent watches in Kubernetes mode (`clusterlink.net/imports`, `pods`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

/// One kind of write the leading agent makes to the API server, and how it went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `status`, `service`, `service-delete`, `target-port` or `event`.
    pub what: &'static str,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// A TLS handshake on the gateway port that did not give a peer identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeFailLabels {
    /// `error` (rustls refused it: not TLS 1.3, a certificate of another CA, ...), `timeout`,
    /// or `no-identity` (a fabric certificate without a DNS name).
    pub reason: &'static str,
}

/// Log lines the rate limit left out (`logging::LogLimiter`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LogLabels {
    /// What failed, as the limiter's key names it (`handshake`, `no-export`, ...).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` (new connections use the new certificate) or `error` (the previous one serves on).
    pub result: &'static str,
}

/// A tunneled connection the agent reset itself, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TerminatedLabels {
    pub direction: &'static str,
    /// `idle`, `denied`, `removed`, `peer-timeout` or `record-limit` (see `lifetime::Ending`
    /// and `kernel::ktls::RecordLimit`).
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
    pub ktls_handoffs: Family<HandoffLabels, Counter>,
    pub paths: Family<PathLabels, Counter>,
    pub ktls_bytes: Family<KtlsBytesLabels, Counter>,
    /// Gateway handshakes that failed, by reason.
    pub handshake_failures: Family<HandshakeFailLabels, Counter>,
    /// Log lines the rate limit left out, by reason.
    pub log_suppressed: Family<LogLabels, Counter>,
    /// State files set aside at start-up (unreadable, not an object, misnamed).
    pub state_files_rejected: Counter,
    /// How long writing one change (an apply, a delete) to the state directory took.
    pub state_commit: Histogram,
    /// Kubernetes mode: 1 while a resource's watch is in sync with the API server.
    pub kubernetes_watch_up: Family<ResourceLabels, Gauge>,
    /// Kubernetes mode: 1 while this agent holds the Lease and writes status and Services.
    pub kubernetes_leader: Gauge,
    pub kubernetes_writes: Family<WriteLabels, Counter>,
    /// Kubernetes mode: objects the API server has that the agent refused (invalid, or an
    /// Import's port in use on the node).
    pub kubernetes_invalid_objects: Gauge,
    /// Reloads of the peer certificate directory, by result.
    pub certificate_reloads: Family<ReloadLabels, Counter>,
    /// Tunneled connections the agent reset itself, by reason.
    pub terminated: Family<TerminatedLabels, Counter>,
    /// Seconds until the served certificate's notAfter, set from `certificate_not_after`
    /// at every scrape.
    certificate_expiry: Gauge,
    /// The served certificate's notAfter (Unix seconds).
    certificate_not_after: AtomicI64,
    /// Connections refused at a cap, by listener and cap.
    pub refusals: Family<RefusalLabels, Counter>,
    /// The caps in force, and how much of each is in use.
    pub limits: Family<LimitLabels, Gauge>,
    pub limits_in_use: Family<LimitLabels, Gauge>,
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
            ktls_handoffs: Family::default(),
            paths: Family::default(),
            ktls_bytes: Family::default(),
            handshake_failures: Family::default(),
            log_suppressed: Family::default(),
            // 1 ms to ~16 s.
            state_commit: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            state_files_rejected: Counter::default(),
            kubernetes_watch_up: Family::default(),
            kubernetes_leader: Gauge::default(),
            kubernetes_writes: Family::default(),
            kubernetes_invalid_objects: Gauge::default(),
            certificate_reloads: Family::default(),
            terminated: Family::default(),
            certificate_expiry: Gauge::default(),
            certificate_not_after: AtomicI64::new(0),
            refusals: Family::default(),
            limits: Family::default(),
            limits_in_use: Family::default(),
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
        registry.register(
            "ktls_handoffs",
            "Tunnels offered to kernel TLS, by result (kernel; failed: reset; fallback-*: \
             carried on in userspace, and why)",
            m.ktls_handoffs.clone(),
        );
        registry.register(
            "connection_paths",
            "Tunneled connections by the path their payload took: userspace (rustls and \
             tokio), sockmap (local hop spliced by sk_msg) or ktls (kernel TLS and splice)",
            m.paths.clone(),
        );
        registry.register(
            "ktls_payload_bytes",
            "Payload bytes of kernel-TLS connections, both ways, by how they moved: spliced \
             (the agent never touched them) or copied (through the agent's memory: data that \
             came before the hand-off or after a control record)",
            m.ktls_bytes.clone(),
        );
        registry.register(
            "gateway_handshake_failures",
            "TLS handshakes on the gateway port that gave no peer identity, by reason: error \
             (refused by TLS: not TLS 1.3, a certificate not of the fabric, not TLS at all), \
             timeout, no-identity (a fabric certificate without a DNS name)",
            m.handshake_failures.clone(),
        );
        registry.register(
            "log_lines_suppressed",
            "Log lines about repeated failures that the log rate limit left out, by reason \
             (each failure is still counted in its own metric)",
            m.log_suppressed.clone(),
        );
        registry.register(
            "state_files_rejected",
            "State files set aside into <state>/rejected/ at start-up (the log names each and \
             why)",
            m.state_files_rejected.clone(),
        );
        registry.register(
            "state_commit_seconds",
            "Time to write one change (an apply or a delete) to the state directory, off the \
             connection workers",
            m.state_commit.clone(),
        );
        registry.register(
            "kubernetes_watch_up",
            "Kubernetes mode: 0 from a failed watch request of a resource until the API server \
             answers that watch again (meanwhile the agent serves the last objects it saw); 1 \
             otherwise",
            m.kubernetes_watch_up.clone(),
        );
        registry.register(
            "kubernetes_leader",
            "Kubernetes mode: 1 while this agent holds the Lease and writes status and Services",
            m.kubernetes_leader.clone(),
        );
        registry.register(
            "kubernetes_writes",
            "Kubernetes mode: writes of the leading agent to the API server, by what and result",
            m.kubernetes_writes.clone(),
        );
        registry.register(
            "kubernetes_invalid_objects",
            "Kubernetes mode: objects in the API server the agent refused: failed validation, \
             or an Import whose port another socket on the node holds (each has a condition \
             or an Event saying why)",
            m.kubernetes_invalid_objects.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Reloads of the peer certificate files (on change or SIGHUP), by result: ok (new \
             connections use the new certificate) or error (the previous one serves on; the \
             log names the file)",
            m.certificate_reloads.clone(),
        );
        registry.register(
            "connections_terminated",
            "Tunneled connections the agent reset, both sides, by reason: idle (no byte either \
             way for --idle-timeout), denied (a policy change denies it), removed (its Import, \
             Export or Peer was deleted or no longer names it), peer-timeout (the peer stopped \
             answering: TCP keepalive or --peer-user-timeout), record-limit (a kTLS tunnel's \
             key reached its cipher's record limit, about 256 GiB one way)",
            m.terminated.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the served peer certificate's notAfter; negative once expired",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "connection_refusals",
            "Connections refused at a cap, by listener (gateway, import, metrics, admin) and \
             cap (connections, import-connections, handshakes, http-connections); the gateway \
             answers a CONNECT past the cap with 503, other refusals are resets",
            m.refusals.clone(),
        );
        registry.register(
            "connection_limit",
            "The connection caps in force (--max-connections, --max-import-connections, \
             --max-handshakes, or derived from the open-file limit)",
            m.limits.clone(),
        );
        registry.register(
            "connection_limit_in_use",
            "Permits of each connection cap held now",
            m.limits_in_use.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The served certificate expires at `not_after` (Unix seconds).
    pub fn set_certificate_not_after(&self, not_after: i64) {
        self.certificate_not_after
            .store(not_after, Ordering::Relaxed);
    }

    pub fn encode(&self) -> String {
        let not_after = self.certificate_not_after.load(Ordering::Relaxed);
        if not_after != 0 {
            self.certificate_expiry
                .set(not_after - time::OffsetDateTime::now_utc().unix_timestamp());
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Connection totals over every label set, for `clink status`: read from the encoded
    /// registry, so they are the very numbers `/metrics` shows.
    pub fn connection_totals(&self) -> ConnectionTotals {
        let text = self.encode();
        let sum = |name: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
            samples(&text, name)
                .filter(|(labels, _)| keep(labels))
                .map(|(_, v)| v as u64)
                .sum()
        };
        let all = |_: &str| true;
        ConnectionTotals {
            active: sum("clink_active_connections", &all),
            opened: sum("clink_connections_opened_total", &all),
            // Whole connections refused: egress once no source could carry it (each skipped
            // source is counted by its own reason), ingress every refusal.
            failed: sum("clink_connections_failed_total", &|l| {
                l.contains("reason=\"no-source\"") || l.contains("direction=\"ingress\"")
            }),
            bytes_out: sum("clink_bytes_total", &|l| l.contains("flow=\"sent\"")),
            bytes_in: sum("clink_bytes_total", &|l| l.contains("flow=\"received\"")),
        }
    }

    pub fn observe(latency: &Latency, direction: &'static str, d: Duration) {
        latency
            .get_or_create(&DirectionLabels { direction })
            .observe(d.as_secs_f64());
    }
}

/// Totals of the connection families, summed over their labels: what `clink status` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionTotals {
    pub active: u64,
    pub opened: u64,
    pub failed: u64,
    /// Payload bytes sent towards remote sides, and received from them.
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// The samples of the series `name` in an OpenMetrics text: (labels, value) for each line
/// `name{labels} value` or `name value`.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        Some((labels, value.trim().parse().ok()?))
    })
}

/// `/metrics`, and `/healthz` for probes (kubelet, load balancers): the agent's event loop
/// answers, which it only does once its state is loaded and its listeners are bound (this
/// server starts last).
fn answer(path: &str, metrics: &Metrics) -> hyper::Response<Full<Bytes>> {
    let text = |status, body: &'static str| {
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    match path {
        "/metrics" => {
            let mut r = hyper::Response::new(Full::new(Bytes::from(metrics.encode())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "see /metrics or /healthz\n"),
    }
}

/// Serves `GET /metrics` and `GET /healthz` until the task is dropped.
/// At most [`limits::HTTP_CONNECTIONS`] at once, each sending its request heads within
/// [`limits::HEADER_TIMEOUT`]: a local user cannot hold the agent's descriptors with partial
/// requests.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let cap = limits::HttpCap::new("metrics", &metrics.refusals);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            debug!("metrics endpoint at its connection cap; closing a connection");
            drop(stream);
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(req.uri().path(), &metrics)) }
            });
            if let Err(e) = limits::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "metrics connection ended");
            }
            drop(permit);
        });
    }
}

pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    limits::bind_tcp(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_and_metrics_paths() {
        use http_body_util::BodyExt as _;
        let m = Metrics::default();
        let body = |r: hyper::Response<Full<Bytes>>| async move {
            (
                r.status(),
                r.into_body().collect().await.unwrap().to_bytes(),
            )
        };
        assert_eq!(
            body(answer("/healthz", &m)).await,
            (StatusCode::OK, Bytes::from_static(b"ok\n"))
        );
        let (status, text) = body(answer("/metrics", &m)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&text).contains("# EOF"));
        assert_eq!(body(answer("/", &m)).await.0, StatusCode::NOT_FOUND);
    }

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

    #[test]
    fn certificate_expiry_is_counted_from_the_scrape() {
        let m = Metrics::default();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let gauge = |m: &Metrics| sample_of(&m.encode(), "clink_certificate_expiry_seconds");
        m.set_certificate_not_after(now + 3600);
        let left = gauge(&m);
        assert!((3590.0..=3600.0).contains(&left), "{left}");
        m.set_certificate_not_after(now - 60);
        let left = gauge(&m);
        assert!(
            (-70.0..=-60.0).contains(&left),
            "an expired certificate: {left}"
        );
    }

    fn sample_of(text: &str, name: &str) -> f64 {
        samples(text, name).next().map_or(f64::NAN, |(_, v)| v)
    }

    #[test]
    fn status_totals_are_the_sums_of_the_families() {
        let m = Metrics::default();
        let conn = |direction, service: &str| ConnLabels {
            direction,
            service: service.into(),
            peer: "peer-b".into(),
        };
        m.opened.get_or_create(&conn(EGRESS, "default/a")).inc();
        m.opened.get_or_create(&conn(EGRESS, "default/b")).inc_by(2);
        m.opened.get_or_create(&conn(INGRESS, "default/c")).inc();
        m.active
            .get_or_create(&DirectionLabels { direction: EGRESS })
            .set(3);
        let fail = |direction, reason| FailLabels {
            direction,
            service: "default/a".into(),
            peer: "peer-b".into(),
            reason,
        };
        m.failed.get_or_create(&fail(EGRESS, "denied")).inc();
        m.failed.get_or_create(&fail(EGRESS, "no-source")).inc();
        m.failed
            .get_or_create(&fail(INGRESS, "no-export"))
            .inc_by(2);
        for (flow, n) in [("sent", 100), ("received", 7)] {
            for service in ["default/a", "default/b"] {
                m.bytes
                    .get_or_create(&BytesLabels {
                        direction: EGRESS,
                        service: service.into(),
                        peer: "peer-b".into(),
                        flow,
                    })
                    .inc_by(n);
            }
        }
        assert_eq!(
            m.connection_totals(),
            ConnectionTotals {
                active: 3,
                opened: 4,
                failed: 3,
                bytes_out: 200,
                bytes_in: 14,
            }
        );
    }
}
