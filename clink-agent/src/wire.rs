//! The peer-to-peer wire protocol on top of mutual TLS: one HTTP/1.1 request head per TLS
//! connection. `CONNECT <export>.<namespace>:443` opens a tunnel (the answer `200` is followed
//! by raw bytes); `GET /healthz` is the heartbeat. Heads are parsed with `httparse` and
//! bounded in size, so a hostile peer costs at most one small buffer.

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::{logging::Untrusted, policy::Attributes};

/// Longest request or response head accepted from a peer.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
/// Longest error body read from a refusing peer.
const MAX_BODY: usize = 1024;

/// One source attribute (`key=value`), repeated; only `client.clusterlink.net/*` keys are
/// believed by the receiver, the peer's own identity comes from its certificate.
pub const SOURCE_HEADER: &str = "clink-source";
/// The importing side's Import, for the exporter's logs.
pub const IMPORT_HEADER: &str = "clink-import";
/// The answering peer's labels on `/healthz` (`k=v,k=v`).
pub const LABELS_HEADER: &str = "clink-peer-labels";
pub const TUNNEL_PORT: u16 = 443;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed HTTP head: {0}")]
    Malformed(String),
    #[error("HTTP head longer than {MAX_HEAD} bytes")]
    TooLong,
    #[error("connection closed before a complete HTTP head")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A parsed head and its length, or `None` while the head is incomplete.
pub type Parsed<T> = Result<Option<(T, usize)>, WireError>;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// The CONNECT request that opens a tunnel to `<export>.<namespace>`.
pub fn connect_request(
    export: &str,
    namespace: &str,
    import: &str,
    source: &Attributes,
) -> Vec<u8> {
    let authority = format!("{export}.{namespace}:{TUNNEL_PORT}");
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    head.push_str(&format!("{IMPORT_HEADER}: {import}\r\n"));
    for (k, v) in source {
        head.push_str(&format!("{SOURCE_HEADER}: {k}={v}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// `k=v,k=v`, the form of [`LABELS_HEADER`].
pub fn format_labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads [`LABELS_HEADER`]; entries that are not valid labels are dropped.
pub fn parse_labels(value: &str) -> std::collections::BTreeMap<String, String> {
    value
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .filter(|(k, v)| crate::api::check_label(k, v).is_ok())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

pub fn healthz_request(peer: &str) -> Vec<u8> {
    format!("GET /healthz HTTP/1.1\r\nHost: {peer}\r\n\r\n").into_bytes()
}

/// Splits a CONNECT authority `export.namespace:port` into export and namespace. The
/// namespace is a DNS label (no dots), so the last dot separates them.
pub fn parse_authority(target: &str) -> Option<(&str, &str)> {
    let host = match target.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => target,
    };
    let (name, namespace) = host.rsplit_once('.')?;
    (!name.is_empty() && !namespace.is_empty()).then_some((name, namespace))
}

/// A complete response: status line, headers and a short plain-text body with the reason.
pub fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if status != 200 || !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn owned_headers(headers: &[httparse::Header<'_>]) -> Result<Vec<(String, String)>, WireError> {
    headers
        .iter()
        .map(|h| {
            let value = std::str::from_utf8(h.value).map_err(|_| {
                WireError::Malformed(format!("header {} is not UTF-8", Untrusted(h.name)))
            })?;
            Ok((h.name.to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// Parses a request head from the start of `buf`: `Ok(None)` when more bytes are needed,
/// else the request and the head's length.
pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((
            Request {
                method: req.method.unwrap_or_default().to_owned(),
                target: req.path.unwrap_or_default().to_owned(),
                headers: owned_headers(req.headers)?,
            },
            len,
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Parses a response head from the start of `buf`, like [`parse_request`].
pub fn parse_response(buf: &[u8]) -> Parsed<Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((
            Response {
                status: resp.code.unwrap_or_default(),
                headers: owned_headers(resp.headers)?,
                body: String::new(),
            },
            len,
        ))),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(WireError::Malformed(e.to_string())),
    }
}

/// Reads from `io` into `buf` until `parse` finds a complete head; the head is removed from
/// `buf`, whatever followed it (tunnel payload) stays there.
pub async fn read_head<T, R>(
    io: &mut R,
    buf: &mut BytesMut,
    parse: fn(&[u8]) -> Parsed<T>,
) -> Result<T, WireError>
where
    R: AsyncRead + Unpin,
{
    loop {
        if let Some((head, len)) = parse(buf)? {
            buf.advance(len);
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD {
            return Err(WireError::TooLong);
        }
        buf.reserve(4096);
        if io.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Reads the response to a request; for refusals also the (short) body with the reason.
pub async fn read_response<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<Response, WireError> {
    let mut resp = read_head(io, buf, parse_response).await?;
    if resp.status != 200 {
        let len = resp
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(MAX_BODY);
        while buf.len() < len {
            if io.read_buf(buf).await? == 0 {
                break;
            }
        }
        let take = len.min(buf.len());
        resp.body = String::from_utf8_lossy(&buf[..take]).into_owned();
        buf.advance(take);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_round_trip() {
        let mut src = Attributes::new();
        src.insert("client.clusterlink.net/namespace".into(), "web".into());
        let req = connect_request("iperf3", "default", "default/iperf3", &src);
        let mut bytes = req.clone();
        bytes.extend_from_slice(b"payload");
        let (parsed, len) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(len, req.len());
        assert_eq!(parsed.method, "CONNECT");
        assert_eq!(parsed.target, "iperf3.default:443");
        assert_eq!(parse_authority(&parsed.target), Some(("iperf3", "default")));
        assert_eq!(
            parsed.header_values(SOURCE_HEADER).collect::<Vec<_>>(),
            ["client.clusterlink.net/namespace=web"]
        );
        assert!(parse_request(&req[..req.len() - 1]).unwrap().is_none());
    }

    #[test]
    fn labels_header_round_trip() {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("env".to_owned(), "prod".to_owned());
        labels.insert("region".to_owned(), "eu-1".to_owned());
        assert_eq!(format_labels(&labels), "env=prod,region=eu-1");
        assert_eq!(
            parse_labels("env=prod, region=eu-1,bad key=x,noequals"),
            labels
        );
    }

    #[test]
    fn authority_forms() {
        assert_eq!(parse_authority("a.b.c:443"), Some(("a.b", "c")));
        assert_eq!(parse_authority("db.prod"), Some(("db", "prod")));
        assert_eq!(parse_authority("nodot:443"), None);
        assert_eq!(parse_authority(".ns:443"), None);
    }

    #[tokio::test]
    async fn refusal_carries_reason() {
        let bytes = response(403, &[], "denied by default (no policy matched)");
        let mut buf = BytesMut::new();
        let resp = read_response(&mut &bytes[..], &mut buf).await.unwrap();
        assert_eq!(resp.status, 403);
        assert_eq!(resp.body, "denied by default (no policy matched)");
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn tunnel_bytes_after_head_are_kept() {
        let mut bytes = response(200, &[], "");
        bytes.extend_from_slice(b"early");
        let mut buf = BytesMut::new();
        let resp = read_response(&mut &bytes[..], &mut buf).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(&buf[..], b"early");
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_are_errors() {
        let mut buf = BytesMut::new();
        let err = read_head(
            &mut &b"\x16\x03\x01garbage\r\n\r\n"[..],
            &mut buf,
            parse_request,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, WireError::Malformed(_)), "{err}");
        let huge = format!(
            "CONNECT a.b:443 HTTP/1.1\r\nx: {}\r\n",
            "y".repeat(MAX_HEAD)
        );
        let mut buf = BytesMut::new();
        let err = read_head(&mut huge.as_bytes(), &mut buf, parse_request)
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::TooLong), "{err}");
        let mut buf = BytesMut::new();
        let err = read_head(&mut &b"CONNECT a.b:443 HT"[..], &mut buf, parse_request)
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::Closed), "{err}");
    }
}
