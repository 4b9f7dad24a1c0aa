//! The agent's side of the admin API.

use std::{
    collections::BTreeMap, convert::Infallible, os::unix::fs::PermissionsExt as _, path::Path,
    sync::Arc, time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixListener;
use tracing::{debug, warn};

use super::{
    status,
    types::{ApplyResponse, ApplyResult, ConnectionsResponse, DeleteResponse, ErrorResponse},
    AdminError,
};
use crate::{
    agent::{off_workers, Agent, ChangeError},
    api::{Kind, Object, ObjectKey},
    limits,
    state::Snapshot,
};

const MAX_BODY: usize = 16 * 1024 * 1024;

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
    // At most `HTTP_CONNECTIONS` at once, each sending its request heads in time: a client
    // that stalls cannot take the socket from `clink`.
    let cap = limits::HttpCap::new("admin", &server.agent.context().metrics.refusals);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = cap.admit() else {
            warn!("admin API at its connection cap; closing a connection");
            continue;
        };
        let server = server.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req).await) }
            });
            if let Err(e) = limits::http1()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
            drop(permit);
        });
    }
}

type Reply = hyper::Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &impl Serialize) -> Reply {
    let body = serde_json::to_vec(body).expect("admin answers are plain data and always serialize");
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn ok(body: &impl Serialize) -> Result<Reply, Fail> {
    Ok(reply(StatusCode::OK, body))
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
            (&Method::GET, ["v1", "status"]) => {
                ok(&status::collect(&self.agent, self.started.elapsed()).await)
            }
            (&Method::GET, ["v1", "connections"]) => ok(&ConnectionsResponse {
                connections: self.agent.context().connections.list(),
            }),
            (&Method::GET, ["v1", "objects", kind]) => self.list(kind, query).await,
            (&Method::POST, ["v1", "apply"]) => self.apply(req).await,
            (&Method::DELETE, ["v1", "objects", kind, ns, name]) => {
                self.delete(kind, ns, name).await
            }
            _ => Err(error(
                StatusCode::NOT_FOUND,
                format!("no such admin endpoint: {method} {path}"),
            )),
        };
        result.unwrap_or_else(|Fail(status, error)| reply(status, &ErrorResponse { error }))
    }

    /// Off the connection workers: a list of thousands of objects takes a while to encode.
    async fn list(&self, kind: &str, query: BTreeMap<String, String>) -> Result<Reply, Fail> {
        let kind = parse_kind(kind)?;
        let snapshot = self.agent.snapshot();
        off_workers(move || list(&snapshot, kind, &query)).await
    }

    async fn apply(&self, req: Request<Incoming>) -> Result<Reply, Fail> {
        self.writable()?;
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading body: {e}")))?
            .to_bytes();
        // Off the connection workers: thousands of objects take a while to parse and validate.
        let objects = off_workers(move || parse_objects(&body)).await?;
        let changes = self.agent.apply(objects).await.map_err(change_error)?;
        off_workers(move || {
            ok(&ApplyResponse {
                results: changes
                    .into_iter()
                    .map(|(key, change)| ApplyResult {
                        object: key.to_string(),
                        change,
                    })
                    .collect(),
            })
        })
        .await
    }

    /// Objects that come from the Kubernetes API are changed there, not here.
    fn writable(&self) -> Result<(), Fail> {
        match self.agent.external_source() {
            Some(source) => Err(error(
                StatusCode::CONFLICT,
                format!("this agent's objects come from {source}; change them there (kubectl apply/delete)"),
            )),
            None => Ok(()),
        }
    }

    async fn delete(&self, kind: &str, ns: &str, name: &str) -> Result<Reply, Fail> {
        self.writable()?;
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
        self.agent.delete(&key).await.map_err(change_error)?;
        ok(&DeleteResponse {
            deleted: key.to_string(),
        })
    }
}

/// Values first, objects second: a body that is not JSON is a bad request, an object that is
/// not valid is unprocessable.
fn parse_objects(body: &[u8]) -> Result<Vec<Object>, Fail> {
    let values: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("body must be a JSON array of objects: {e}"),
        )
    })?;
    values
        .into_iter()
        .map(Object::from_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e))
}

fn list(snapshot: &Snapshot, kind: Kind, query: &BTreeMap<String, String>) -> Result<Reply, Fail> {
    let namespace = query.get("namespace").filter(|n| !n.is_empty());
    let name = query.get("name").filter(|n| !n.is_empty());
    let items: Vec<&Object> = snapshot
        .objects
        .iter()
        .filter(|(k, _)| k.kind == kind)
        .filter(|(k, _)| namespace.is_none_or(|ns| !kind.namespaced() || &k.namespace == ns))
        .filter(|(k, _)| name.is_none_or(|n| &k.name == n))
        .map(|(_, o)| o)
        .collect();
    if let (Some(name), true) = (name, items.is_empty()) {
        let ns = namespace.map(|n| format!("{n}/")).unwrap_or_default();
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("{kind} {ns}{name} not found"),
        ));
    }
    ok(&items)
}

fn change_error(e: ChangeError) -> Fail {
    let status = match e {
        ChangeError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        ChangeError::Busy(_) => StatusCode::CONFLICT,
        ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
        ChangeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e)
}
