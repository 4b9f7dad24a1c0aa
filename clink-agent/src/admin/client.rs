//! The CLI's side of the admin API: one typed method per request.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use super::{
    types::{ApplyResponse, ConnectionsResponse, DeleteResponse, ErrorResponse, StatusResponse},
    AdminError,
};
use crate::api::{Kind, Object, ObjectKey};

pub struct Client {
    path: PathBuf,
}

impl Client {
    pub fn new(path: &Path) -> Client {
        Client {
            path: path.to_owned(),
        }
    }

    pub async fn status(&self) -> Result<StatusResponse, AdminError> {
        self.call(Method::GET, "/v1/status", None::<&()>).await
    }

    /// The open tunneled connections and their paths.
    pub async fn connections(&self) -> Result<ConnectionsResponse, AdminError> {
        self.call(Method::GET, "/v1/connections", None::<&()>).await
    }

    /// Objects of `kind`, in `namespace` (every namespace when `None`), named `name` (all when
    /// `None`; a name that matches nothing is an error).
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Object>, AdminError> {
        let mut uri = format!("/v1/objects/{kind}?");
        if let Some(namespace) = namespace {
            uri.push_str(&format!("namespace={namespace}&"));
        }
        if let Some(name) = name {
            uri.push_str(&format!("name={name}"));
        }
        self.call(Method::GET, &uri, None::<&()>).await
    }

    /// Applies all of `objects` or none.
    pub async fn apply(&self, objects: &[Object]) -> Result<ApplyResponse, AdminError> {
        self.call(Method::POST, "/v1/apply", Some(objects)).await
    }

    pub async fn delete(&self, key: &ObjectKey) -> Result<DeleteResponse, AdminError> {
        let namespace = if key.namespace.is_empty() {
            "_"
        } else {
            &key.namespace
        };
        let uri = format!("/v1/objects/{}/{namespace}/{}", key.kind, key.name);
        self.call(Method::DELETE, &uri, None::<&()>).await
    }

    /// Sends one request; a non-2xx answer becomes `AdminError::Api` with the agent's message.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        uri: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, AdminError> {
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
        let body = match body {
            Some(body) => serde_json::to_vec(body)
                .map_err(|e| AdminError::Http(format!("encoding the request: {e}")))?,
            None => Vec::new(),
        };
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
        if status.is_success() {
            serde_json::from_slice(&bytes)
                .map_err(|e| AdminError::Http(format!("unexpected answer to {uri}: {e}")))
        } else {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("agent answered {status}"));
            Err(AdminError::Api(message))
        }
    }
}
