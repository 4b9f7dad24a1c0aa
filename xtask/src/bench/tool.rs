//! `xtask bench-tool`: the bench's own load generators and servers, run as separate processes
//! so that they can be placed in a cluster's namespace and, for the kernel data paths, in the
//! bench's cgroup (`ip netns exec` and `cgroup.procs` act on whole processes).
//!
//! Each tool prints one JSON object on stdout when it has something to report.

use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::reply;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Subcommand, Debug)]
pub enum Tool {
    /// Echoes every byte back until the client closes.
    EchoServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// New connections in a loop, each carrying one request that is echoed back, then closed;
    /// prints `{"connections": N, "errors": N, "seconds": S}`.
    ConnectRate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        /// Connections in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// One connection, one message in flight: sends `size` bytes, waits for the echo,
    /// repeats; prints the round-trip times' percentiles as
    /// `{"messages": N, "p50_us": X, "p99_us": Y}` (the first fifth of the run, at most
    /// 200 ms, is a warm-up and not counted).
    PingPong {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Answers each request of `pipelined` with a response of the size the request asks
    /// for, in order, until the client closes (framing: [`super::reply`]).
    ReplyServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// `connections` connections, each keeping `depth` requests of `size` bytes in flight
    /// (a new one whenever a response completes), each answered by the reply server with
    /// `response-size` bytes; prints
    /// `{"requests": N, "total": N, "seconds": S, "p50_us": X, "p99_us": Y}`: the responses
    /// after a warm-up (the first fifth of the run, at most 200 ms), all responses, the
    /// seconds after the warm-up, and the percentiles of the time from a request's write to
    /// its whole response.
    Pipelined {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 64)]
        response_size: usize,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 16)]
        depth: usize,
    },
    /// Opens connections and proves each one with an echoed request, prints
    /// `{"open": N}`, then holds them until its standard input closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

pub fn run(tool: Tool) -> Result<()> {
    raise_nofile_limit()?;
    if let Tool::PingPong { to, seconds, size } = tool {
        return print_json(&ping_pong(to, seconds, size)?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    match tool {
        Tool::EchoServer { listen } => runtime.block_on(echo_server(listen)),
        Tool::ReplyServer { listen } => runtime.block_on(reply::server(listen)),
        Tool::Pipelined {
            to,
            seconds,
            size,
            response_size,
            connections,
            depth,
        } => {
            let report = runtime.block_on(reply::client(reply::Load {
                to,
                connections,
                depth,
                request: size,
                response: response_size,
                seconds,
            }))?;
            print_json(&report)
        }
        Tool::ConnectRate {
            to,
            seconds,
            concurrency,
            size,
        } => {
            let report = runtime.block_on(connect_rate(to, seconds, concurrency, size))?;
            print_json(&report)
        }
        Tool::PingPong { .. } => unreachable!("runs without the runtime"),
        Tool::Hold {
            to,
            connections,
            size,
        } => {
            let held = runtime.block_on(open_connections(to, connections, size))?;
            print_json(&serde_json::json!({ "open": held.len() }))?;
            // Held until the bench has read the memory figures and closes our stdin.
            let mut line = String::new();
            while std::io::stdin().lock().read_line(&mut line)? > 0 {}
            drop(held);
            Ok(())
        }
    }
}

/// A thousand sockets need more than the usual soft limit of 1,024 descriptors.
fn raise_nofile_limit() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

/// Blocking calls on one thread: nothing between the clock and the socket but the kernel.
fn ping_pong(to: SocketAddr, seconds: f64, size: usize) -> Result<serde_json::Value> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
        .with_context(|| format!("connect to {to}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let message: Vec<u8> = (0..size).map(|i| i as u8).collect();
    let mut echo = vec![0; size];
    let started = Instant::now();
    let warm_up = Duration::from_secs_f64(seconds / 5.0).min(Duration::from_millis(200));
    let end = started + Duration::from_secs_f64(seconds);
    let mut rtts = Vec::new();
    loop {
        let sent = Instant::now();
        if sent >= end {
            break;
        }
        stream.write_all(&message)?;
        stream.read_exact(&mut echo).context("no echo")?;
        if sent - started >= warm_up {
            rtts.push(sent.elapsed());
        }
    }
    if echo != message {
        bail!("the echo differs from the message");
    }
    if rtts.is_empty() {
        bail!("no message came back within {seconds} s");
    }
    rtts.sort();
    let percentile = |p: f64| {
        let rank = ((p / 100.0) * rtts.len() as f64).ceil() as usize;
        rtts[rank.clamp(1, rtts.len()) - 1].as_secs_f64() * 1e6
    };
    Ok(serde_json::json!({
        "messages": rtts.len(),
        "p50_us": percentile(50.0),
        "p99_us": percentile(99.0),
    }))
}

async fn echo_server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    loop {
        let (mut stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buf = vec![0; 16 * 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// One connection: connect, send `size` bytes, read them back.
async fn request(to: SocketAddr, payload: &[u8]) -> Result<TcpStream> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    stream.write_all(payload).await?;
    let mut answer = vec![0; payload.len()];
    tokio::time::timeout(CONNECT_TIMEOUT, stream.read_exact(&mut answer))
        .await
        .context("no answer")??;
    if answer != payload {
        bail!("the echo differs from the request");
    }
    Ok(stream)
}

async fn connect_rate(
    to: SocketAddr,
    seconds: f64,
    concurrency: usize,
    size: usize,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let payload: std::sync::Arc<[u8]> = (0..size).map(|i| i as u8).collect();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let payload = payload.clone();
        workers.spawn(async move {
            let (mut done, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                match request(to, &payload).await {
                    Ok(stream) => {
                        drop(stream);
                        done += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            (done, errors, first_error)
        });
    }
    let (mut done, mut errors, mut first_error) = (0, 0, None);
    while let Some(result) = workers.join_next().await {
        let (d, e, first) = result.context("a connect-rate worker panicked")?;
        done += d;
        errors += e;
        first_error = first_error.or(first);
    }
    Ok(serde_json::json!({
        "connections": done,
        "errors": errors,
        "first_error": first_error,
        "seconds": started.elapsed().as_secs_f64(),
    }))
}

async fn open_connections(to: SocketAddr, count: usize, size: usize) -> Result<Vec<TcpStream>> {
    // A few at a time: a thousand SYNs at once would overflow the listeners' backlogs and
    // measure SYN retransmission timers instead.
    const IN_FLIGHT: usize = 32;
    let payload: std::sync::Arc<[u8]> = (0..size).map(|i| i as u8).collect();
    let mut held = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < count {
        while started < count && pending.len() < IN_FLIGHT {
            let payload = payload.clone();
            pending.spawn(async move { request(to, &payload).await });
            started += 1;
        }
        let stream = pending
            .join_next()
            .await
            .context("no connection in flight")?
            .context("a connection task panicked")?
            .with_context(|| format!("connection {} of {count} to {to}", held.len() + 1))?;
        held.push(stream);
    }
    Ok(held)
}
