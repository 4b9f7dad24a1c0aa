//! The local admin API the `clink` CLI talks to: HTTP/1.1 with JSON bodies over a Unix socket
//! that only root can open (mode 0600 in a 0700 directory).
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/status` | agent name, gateway, data path, object counts, import ports, counters |
//! | `GET /v1/objects/<Kind>[?namespace=NS][&name=N]` | JSON array of objects |
//! | `POST /v1/apply` (JSON array of objects) | `{"results": [{"object", "change"}]}`, all or nothing |
//! | `DELETE /v1/objects/<Kind>/<namespace or _>/<name>` | `{"deleted": "..."}` |
//!
//! Errors answer 4xx/5xx with `{"error": "<one line>"}`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::{
    agent::{Agent, ChangeError},
    api::{Kind, Object, ObjectKey},
};

pub const DEFAULT_SOCKET: &str = "/run/clusterlink/admin.sock";
const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the agent at {path}: {source} (is clink-agent running? point to its \
         socket with --admin or CLINK_ADMIN)"
    )]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0} is in use by a running agent")]
    InUse(PathBuf),
    #[error("admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin API: {0}")]
    Http(String),
    #[error("{0}")]
    Api(String),
}

/// Binds the admin socket, replacing a stale one left by a crashed agent but never the
/// socket of a live one.
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    let bind_err = |source| AdminError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(bind_err)?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

struct Server {
    agent: Arc<Agent>,
    started: Instant,
}

pub async fn serve(listener: UnixListener, agent: Arc<Agent>) {
    let server = Arc::new(Server {
        agent,
        started: Instant::now(),
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}

type Reply = hyper::Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A refused admin request: the status and a one-line reason.
struct Fail(StatusCode, String);

fn error(status: StatusCode, message: impl std::fmt::Display) -> Fail {
    Fail(status, message.to_string())
}

fn parse_kind(s: &str) -> Result<Kind, Fail> {
    Kind::parse(s).ok_or_else(|| error(StatusCode::NOT_FOUND, format!("unknown kind {s:?}")))
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        let query: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        let result = match (&method, segments.as_slice()) {
            (&Method::GET, ["v1", "status"]) => Ok(self.status().await),
            (&Method::GET, ["v1", "objects", kind]) => self.list(kind, &query),
            (&Method::POST, ["v1", "apply"]) => self.apply(req).await,
            (&Method::DELETE, ["v1", "objects", kind, ns, name]) => {
                self.delete(kind, ns, name).await
            }
            _ => Err(error(
                StatusCode::NOT_FOUND,
                format!("no such admin endpoint: {method} {path}"),
            )),
        };
        result.unwrap_or_else(|Fail(status, message)| reply(status, json!({ "error": message })))
    }

    async fn status(&self) -> Reply {
        let snapshot = self.agent.snapshot();
        let mut counts = BTreeMap::new();
        for kind in Kind::ALL {
            counts.insert(kind.as_str(), 0usize);
        }
        for key in snapshot.objects.keys() {
            *counts.entry(key.kind.as_str()).or_default() += 1;
        }
        let imports: Vec<Value> = self
            .agent
            .import_ports()
            .await
            .into_iter()
            .map(|(key, port)| json!({ "import": key.to_string(), "port": port }))
            .collect();
        let mut peers: Vec<_> = snapshot.peers.iter().collect();
        peers.sort_by_key(|(name, _)| name.as_str());
        let peers: Vec<Value> = peers
            .into_iter()
            .map(|(name, p)| {
                let reachable = p
                    .status
                    .condition(crate::api::PEER_REACHABLE)
                    .map(|c| c.status.clone())
                    .unwrap_or_else(|| "Unknown".to_owned());
                json!({ "name": name, "reachable": reachable, "labels": p.status.labels })
            })
            .collect();
        reply(
            StatusCode::OK,
            json!({
                "name": self.agent.name(),
                "peers": peers,
                "version": env!("CARGO_PKG_VERSION"),
                "gateway": self.agent.gateway().to_string(),
                "datapath": self.agent.datapath().name(),
                "labels": self.agent.labels(),
                "uptimeSeconds": self.started.elapsed().as_secs(),
                "objects": counts,
                "imports": imports,
                "connections": connections(self.agent.metrics().connection_totals()),
            }),
        )
    }

    fn list(&self, kind: &str, query: &BTreeMap<String, String>) -> Result<Reply, Fail> {
        let kind = parse_kind(kind)?;
        let namespace = query.get("namespace").filter(|n| !n.is_empty());
        let name = query.get("name").filter(|n| !n.is_empty());
        let snapshot = self.agent.snapshot();
        let items: Vec<Value> = snapshot
            .objects
            .iter()
            .filter(|(k, _)| k.kind == kind)
            .filter(|(k, _)| namespace.is_none_or(|ns| !kind.namespaced() || &k.namespace == ns))
            .filter(|(k, _)| name.is_none_or(|n| &k.name == n))
            .map(|(_, o)| o.to_json())
            .collect();
        if let (Some(name), true) = (name, items.is_empty()) {
            let ns = namespace.map(|n| format!("{n}/")).unwrap_or_default();
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("{kind} {ns}{name} not found"),
            ));
        }
        Ok(reply(StatusCode::OK, Value::Array(items)))
    }

    async fn apply(&self, req: Request<Incoming>) -> Result<Reply, Fail> {
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading body: {e}")))?
            .to_bytes();
        let values: Vec<Value> = serde_json::from_slice(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("body must be a JSON array of objects: {e}"),
            )
        })?;
        let objects = values
            .into_iter()
            .map(Object::from_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e))?;
        match self.agent.apply(objects).await {
            Ok(changes) => {
                let results: Vec<Value> = changes
                    .into_iter()
                    .map(|(key, change)| json!({ "object": key.to_string(), "change": change }))
                    .collect();
                Ok(reply(StatusCode::OK, json!({ "results": results })))
            }
            Err(e) => Err(change_error(e)),
        }
    }

    async fn delete(&self, kind: &str, ns: &str, name: &str) -> Result<Reply, Fail> {
        let kind = parse_kind(kind)?;
        let key = ObjectKey {
            kind,
            namespace: if kind.namespaced() && ns != "_" {
                ns.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        };
        self.agent
            .delete(&key)
            .await
            .map_err(change_error)
            .map(|()| reply(StatusCode::OK, json!({ "deleted": key.to_string() })))
    }
}

fn connections(c: crate::metrics::ConnectionTotals) -> Value {
    json!({
        "active": c.active,
        "opened": c.opened,
        "failed": c.failed,
        "bytes_out": c.bytes_out,
        "bytes_in": c.bytes_in,
    })
}

fn change_error(e: ChangeError) -> Fail {
    let status = match e {
        ChangeError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}

/// The CLI's side of the admin API.
pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_owned(),
        }
    }

    /// Sends one request; a non-2xx answer becomes `AdminError::Api` with the agent's message.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> Result<Value, AdminError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| AdminError::Unreachable {
                    path: self.path.clone(),
                    source,
                })?;
        let http = |e: hyper::Error| AdminError::Http(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(conn);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "clink-agent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| AdminError::Http(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| AdminError::Http(format!("answer is not JSON: {e}")))?;
        if status.is_success() {
            Ok(value)
        } else {
            let message = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("agent answered {status}"));
            Err(AdminError::Api(message))
        }
    }
}
