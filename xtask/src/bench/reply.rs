//! The pipelined request/response protocol of `xtask bench-tool reply-server` and
//! `xtask bench-tool pipelined`: small requests that each say how large their response is,
//! so one server per route answers every response size the bench measures.
//!
//! A request is `size` bytes: a header of three big-endian fields (`size` as u32, the
//! response's size as u32, a sequence number as u64), then filler bytes. The response is
//! the sequence number (u64, big-endian), then filler up to the size asked for. The server
//! answers in order and as many requests at once as one read brings; the client checks
//! every sequence number, so a response that is lost, duplicated, reordered or cut short
//! fails the run instead of counting.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A request's header: its own size, the response's size, the sequence number.
pub const HEADER: usize = 16;
/// Requests above this are refused: the server buffers a whole request.
pub const MAX_REQUEST: usize = 64 << 10;
/// A response holds at least the sequence number.
pub const MIN_RESPONSE: usize = 8;
/// Responses above this are refused: the server builds each one in memory.
pub const MAX_RESPONSE: usize = 1 << 20;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One request, as the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request's whole size, header included.
    pub size: usize,
    /// The size of the response it asks for.
    pub response: usize,
    pub seq: u64,
}

impl Request {
    /// Appends the request's `size` bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&(self.size as u32).to_be_bytes());
        out.extend_from_slice(&(self.response as u32).to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend((HEADER..self.size).map(|i| i as u8));
        debug_assert_eq!(out.len() - start, self.size);
    }

    /// The request at the front of `buf`: `None` until its header and body are all there;
    /// an error for a header no client of the bench sends.
    pub fn decode(buf: &[u8]) -> Result<Option<Request>> {
        let Some(header) = buf.get(..HEADER) else {
            return Ok(None);
        };
        let field = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or([0; 4]));
        let size = field(0) as usize;
        let response = field(4) as usize;
        let seq = u64::from_be_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        ensure!(
            (HEADER..=MAX_REQUEST).contains(&size),
            "request {seq} says it is {size} bytes long, outside {HEADER}..={MAX_REQUEST}"
        );
        ensure!(
            (MIN_RESPONSE..=MAX_RESPONSE).contains(&response),
            "request {seq} asks for a {response}-byte response, outside \
             {MIN_RESPONSE}..={MAX_RESPONSE}"
        );
        Ok((buf.len() >= size).then_some(Request {
            size,
            response,
            seq,
        }))
    }
}

/// Appends the response to `request` to `out`.
fn respond(request: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&request.seq.to_be_bytes());
    out.extend((MIN_RESPONSE..request.response).map(|i| i as u8));
}

/// Answers every whole request at the front of `input`, appending the responses to
/// `output` in order; returns how many bytes of `input` they took.
pub fn answer(input: &[u8], output: &mut Vec<u8>) -> Result<usize> {
    let mut used = 0;
    while let Some(request) = Request::decode(&input[used..])? {
        respond(&request, output);
        used += request.size;
    }
    Ok(used)
}

/// The sequence number a response starts with.
fn response_seq(response: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(response.get(..8)?.try_into().ok()?))
}

pub async fn server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    accept(listener).await
}

async fn accept(listener: TcpListener) -> Result<()> {
    loop {
        let (stream, peer) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if let Err(e) = serve(stream).await {
                // Into the route's server log: a client that broke the protocol.
                eprintln!("reply-server: connection from {peer}: {e:#}");
            }
        });
    }
}

/// One connection: answers until the client closes.
async fn serve(mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut input = vec![0; 64 << 10];
    let mut filled = 0;
    let mut output = Vec::with_capacity(64 << 10);
    loop {
        if filled == input.len() {
            // Only a request larger than the buffer gets here; MAX_REQUEST bounds it.
            input.resize(input.len() * 2, 0);
        }
        let n = stream.read(&mut input[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let used = answer(&input[..filled], &mut output)?;
        input.copy_within(used..filled, 0);
        filled -= used;
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
    }
}

/// What the pipelined client measures.
#[derive(Clone, Debug, PartialEq)]
pub struct Load {
    pub to: SocketAddr,
    pub connections: usize,
    /// Requests each connection keeps in flight.
    pub depth: usize,
    pub request: usize,
    pub response: usize,
    pub seconds: f64,
}

/// What one connection saw.
#[derive(Debug, Default)]
struct Counts {
    /// Responses that completed within the window.
    in_window: u64,
    /// All responses, warm-up included.
    total: u64,
    /// Of each response in the window, the time since its request was written, in ns.
    latencies: Vec<u64>,
}

/// `connections` connections, each keeping `depth` requests in flight for `seconds`: a
/// new request is written whenever a response completes. Requests per second and the
/// latency percentiles count the responses after a warm-up (the first fifth of the run, at
/// most 200 ms, in which the connections are set up); prints
/// `{"requests": N, "total": N, "seconds": S, "p50_us": X, "p99_us": Y}`.
pub async fn client(load: Load) -> Result<serde_json::Value> {
    ensure!(
        (HEADER..=MAX_REQUEST).contains(&load.request),
        "--size must be {HEADER}..={MAX_REQUEST} bytes"
    );
    ensure!(
        (MIN_RESPONSE..=MAX_RESPONSE).contains(&load.response),
        "--response-size must be {MIN_RESPONSE}..={MAX_RESPONSE} bytes"
    );
    ensure!(
        load.connections > 0 && load.depth > 0,
        "--connections and --depth must be at least 1"
    );
    let started = Instant::now();
    let warm_up = Duration::from_secs_f64(load.seconds / 5.0).min(Duration::from_millis(200));
    let window = (
        started + warm_up,
        started + Duration::from_secs_f64(load.seconds),
    );
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..load.connections {
        let load = load.clone();
        workers.spawn(async move {
            connection(&load, window).await.with_context(|| {
                format!(
                    "connection {} of {} to {}",
                    index + 1,
                    load.connections,
                    load.to
                )
            })
        });
    }
    let mut all = Counts::default();
    while let Some(result) = workers.join_next().await {
        let counts = result.context("a pipelined connection panicked")??;
        all.in_window += counts.in_window;
        all.total += counts.total;
        all.latencies.extend(counts.latencies);
    }
    if all.in_window == 0 {
        bail!("no response came back within {} s", load.seconds);
    }
    all.latencies.sort_unstable();
    let percentile = |p: f64| {
        let n = all.latencies.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        all.latencies[rank.clamp(1, n) - 1] as f64 / 1e3
    };
    Ok(serde_json::json!({
        "requests": all.in_window,
        "total": all.total,
        "seconds": (window.1 - window.0).as_secs_f64(),
        "p50_us": percentile(50.0),
        "p99_us": percentile(99.0),
    }))
}

/// One connection of the pipelined client, until the window closes.
async fn connection(load: &Load, (from, until): (Instant, Instant)) -> Result<Counts> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(load.to))
        .await
        .context("connect timed out")?
        .context("connect")?;
    stream.set_nodelay(true)?;
    let mut counts = Counts::default();
    let mut next_seq = 0u64;
    let mut expected = 0u64;
    // When each request in flight was written, oldest first.
    let mut in_flight = VecDeque::with_capacity(load.depth);
    let mut out = Vec::with_capacity(load.depth * load.request);
    let mut write = |count: usize, out: &mut Vec<u8>, in_flight: &mut VecDeque<Instant>| {
        let now = Instant::now();
        for _ in 0..count {
            Request {
                size: load.request,
                response: load.response,
                seq: next_seq,
            }
            .encode(out);
            next_seq += 1;
            in_flight.push_back(now);
        }
    };
    write(load.depth, &mut out, &mut in_flight);
    stream.write_all(&out).await?;
    let mut input = vec![0; (64 << 10).max(2 * load.response)];
    let mut filled = 0;
    loop {
        let read = tokio::time::timeout_at(until.into(), stream.read(&mut input[filled..]));
        let Ok(n) = read.await else {
            return Ok(counts);
        };
        let n = n.context("read")?;
        ensure!(
            n > 0,
            "the server closed the connection after {} responses",
            counts.total
        );
        filled += n;
        let now = Instant::now();
        let mut used = 0;
        let mut done = 0;
        while filled - used >= load.response {
            let seq =
                response_seq(&input[used..]).context("a response without its sequence number")?;
            ensure!(
                seq == expected,
                "response {seq} came where response {expected} was due"
            );
            expected += 1;
            let sent = in_flight
                .pop_front()
                .context("a response to no request in flight")?;
            counts.total += 1;
            if now >= from && now < until {
                counts.in_window += 1;
                counts.latencies.push((now - sent).as_nanos() as u64);
            }
            used += load.response;
            done += 1;
        }
        input.copy_within(used..filled, 0);
        filled -= used;
        if done > 0 && now < until {
            out.clear();
            write(done, &mut out, &mut in_flight);
            stream.write_all(&out).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_sizes_and_sequence_number() {
        let request = Request {
            size: 64,
            response: 1024,
            seq: 7,
        };
        let mut buf = Vec::new();
        request.encode(&mut buf);
        assert_eq!(buf.len(), 64);
        assert_eq!(
            buf[..HEADER],
            [0, 0, 0, 64, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(Request::decode(&buf).unwrap(), Some(request));
        // Not all there yet.
        assert_eq!(Request::decode(&buf[..HEADER - 1]).unwrap(), None);
        assert_eq!(Request::decode(&buf[..63]).unwrap(), None);
    }

    #[test]
    fn the_server_answers_every_whole_request_in_order() {
        let mut input = Vec::new();
        for (seq, response) in [(0, 64), (1, 1024), (2, 8)] {
            Request {
                size: 64,
                response,
                seq,
            }
            .encode(&mut input);
        }
        // Half of a fourth request: kept for the next read.
        input.extend_from_slice(&[0, 0, 0, 64, 0, 0, 0, 64]);
        let mut output = Vec::new();
        assert_eq!(answer(&input, &mut output).unwrap(), 3 * 64);
        assert_eq!(output.len(), 64 + 1024 + 8);
        assert_eq!(response_seq(&output), Some(0));
        assert_eq!(response_seq(&output[64..]), Some(1));
        assert_eq!(response_seq(&output[64 + 1024..]), Some(2));
        assert_eq!(output[8..12], [8, 9, 10, 11]);
    }

    #[test]
    fn the_server_refuses_what_no_client_sends() {
        let header = |size: u32, response: u32| {
            let mut h = Vec::new();
            h.extend_from_slice(&size.to_be_bytes());
            h.extend_from_slice(&response.to_be_bytes());
            h.extend_from_slice(&5u64.to_be_bytes());
            h
        };
        let err = answer(&header(64, 2 << 20), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("2097152-byte response"), "{err}");
        assert!(answer(&header(4, 64), &mut Vec::new()).is_err());
        assert!(answer(&header(1 << 20, 64), &mut Vec::new()).is_err());
        assert!(answer(&header(64, 4), &mut Vec::new()).is_err());
    }

    #[tokio::test]
    async fn the_client_counts_checked_responses_from_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let server = tokio::spawn(accept(listener));
        for response in [64, 1024] {
            let report = client(Load {
                to,
                connections: 3,
                depth: 4,
                request: 64,
                response,
                seconds: 0.3,
            })
            .await
            .unwrap();
            let requests = report["requests"].as_u64().unwrap();
            assert!(requests > 100, "{report}");
            assert!(report["total"].as_u64().unwrap() >= requests, "{report}");
            let (p50, p99) = (
                report["p50_us"].as_f64().unwrap(),
                report["p99_us"].as_f64().unwrap(),
            );
            assert!(0.0 < p50 && p50 <= p99, "{report}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn the_client_fails_on_a_server_that_does_not_answer_in_order() {
        // An echo server: its "responses" are the requests, whose first eight bytes are
        // the sizes, not the sequence number.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let err = client(Load {
            to,
            connections: 1,
            depth: 2,
            request: 64,
            response: 64,
            seconds: 1.0,
        })
        .await
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("where response 0 was due"),
            "{err:#}"
        );
        echo.abort();
    }
}
