//! A fault-injecting HTTP proxy on loopback in front of moto (S3, DynamoDB, Secrets Manager).
//!
//! Every request gets its own upstream connection (`Connection: close` both ways), so the proxy
//! never has to frame bodies and can decide request by request what happens, following a
//! schedule the test gives it: pass it on, answer a 500/503 with the service's error body (S3's
//! XML, DynamoDB's JSON), drop the connection before the request reached moto, drop it after
//! moto applied the request (the change happened, the answer is lost), delay it, or hold it
//! unanswered (every later request too) so that a test can kill the process at that point.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// What the proxy knows of a request when it decides what to do with it.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    /// 0 for the first request the proxy saw, then 1, 2, ...
    pub index: u64,
    /// HTTP method.
    pub method: String,
    /// Percent-decoded path (S3: `/bucket/key`).
    pub path: String,
    /// Raw query string.
    pub query: String,
    /// `X-Amz-Target` (DynamoDB, Secrets Manager), e.g. `DynamoDB_20120810.UpdateItem`.
    pub target: Option<String>,
    /// The JSON body of a DynamoDB or Secrets Manager call (empty for S3).
    pub body: String,
}

impl RequestInfo {
    /// A short name of the call: `S3 PUT /bucket/key` or `DynamoDB_20120810.UpdateItem`.
    pub fn call(&self) -> String {
        match &self.target {
            Some(t) => t.clone(),
            None => format!("S3 {} {}", self.method, self.path),
        }
    }

    /// Whether this is a JSON-protocol call (DynamoDB, Secrets Manager) rather than S3.
    pub fn is_json_protocol(&self) -> bool {
        self.target.is_some()
    }
}

/// What the proxy does with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Forward it and relay the answer.
    Pass,
    /// Answer this status (500 or 503) with the service's error body; moto never sees it.
    Error(u16),
    /// Reset the connection before forwarding: the request never reached moto.
    DropBefore,
    /// Forward it, wait until moto answered (the change is applied), then reset the connection.
    DropAfter,
    /// Wait this long, then forward it.
    Delay(Duration),
    /// Never answer it, nor any request after it, until [`Proxy::release`].
    Hold,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Pass => f.write_str("pass"),
            Action::Error(s) => write!(f, "HTTP {s}"),
            Action::DropBefore => f.write_str("drop before"),
            Action::DropAfter => f.write_str("drop after"),
            Action::Delay(d) => write!(f, "delay {}ms", d.as_millis()),
            Action::Hold => f.write_str("hold"),
        }
    }
}

/// Decides what happens to each request.
pub type Schedule = Box<dyn FnMut(&RequestInfo) -> Action + Send>;

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Answered with an injected 5xx.
    pub errors: AtomicU64,
    /// Connections dropped before the request reached moto.
    pub dropped_before: AtomicU64,
    /// Connections dropped after moto applied the request.
    pub dropped_after: AtomicU64,
    /// Requests delayed.
    pub delayed: AtomicU64,
    /// Requests held.
    pub held: AtomicU64,
}

struct Shared {
    upstream: SocketAddr,
    schedule: Mutex<Schedule>,
    next_index: AtomicU64,
    /// True from the first `Hold` until `release`: every request is held.
    holding: Mutex<bool>,
    /// Signalled when a request is held.
    held: Notify,
    /// Bumped by `release`: held connections are dropped.
    released: watch::Sender<u64>,
    stats: ProxyStats,
    /// The faults injected, in order (`#index call: action`), for failure reports.
    log: Mutex<Vec<String>>,
    /// Requests on their way to moto (delayed or being forwarded), whether or not their client
    /// is still there: a killed process's last request may still land.
    in_flight: AtomicU64,
}

/// A running proxy; it stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free loopback port in front of `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str, schedule: Schedule) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("the upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            upstream,
            schedule: Mutex::new(schedule),
            next_index: AtomicU64::new(0),
            holding: Mutex::new(false),
            held: Notify::new(),
            released: watch::channel(0).0,
            stats: ProxyStats::default(),
            log: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
        });
        let accept = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                tokio::spawn(serve(client, accept.clone()));
            }
        });
        Proxy { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the schedule.
    pub fn set_schedule(&self, schedule: Schedule) {
        *self.shared.schedule.lock().unwrap() = schedule;
    }

    /// Waits until a request is held.
    pub async fn wait_held(&self) {
        loop {
            let notified = self.shared.held.notified();
            if *self.shared.holding.lock().unwrap() {
                return;
            }
            notified.await;
        }
    }

    /// Whether requests are being held.
    pub fn holding(&self) -> bool {
        *self.shared.holding.lock().unwrap()
    }

    /// Stops holding: held connections are dropped and new requests follow the schedule again.
    pub fn release(&self) {
        *self.shared.holding.lock().unwrap() = false;
        self.shared.released.send_modify(|n| *n += 1);
    }

    /// Waits (up to 10 s) until no request is on its way to moto any more: after a kill, the
    /// killed process's last requests have landed or died.
    pub async fn settle(&self) {
        for _ in 0..1000 {
            if self.shared.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// The injected faults, in order.
    pub fn log(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.release();
    }
}

const MAX_HEAD: usize = 64 * 1024;

/// Reads until the end of an HTTP head; returns the bytes read and where the head ends.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(p + 4);
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The head with any `Connection`/`Keep-Alive` header replaced by `Connection: close`.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::with_capacity(text.len() + 20);
    for (i, line) in text.split("\r\n").enumerate() {
        if line.is_empty() {
            continue;
        }
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0
            && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_request(index: u64, head: &[u8]) -> RequestInfo {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let target = first.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let amz_target = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("x-amz-target")
            .then(|| value.trim().to_string())
    });
    RequestInfo {
        index,
        method,
        path: percent_decode(path),
        query: query.to_string(),
        target: amz_target,
        body: String::new(),
    }
}

/// The `Content-Length` of a request head.
fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).split("\r\n").find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-length") {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// The largest JSON-protocol body read before deciding (DynamoDB items here are small).
const MAX_JSON_BODY: usize = 1 << 20;

/// The error answer of the service the request is for.
fn error_answer(status: u16, info: &RequestInfo) -> Vec<u8> {
    let reason = if status == 503 {
        "Service Unavailable"
    } else {
        "Internal Server Error"
    };
    let (content_type, body) = if info.is_json_protocol() {
        let kind = if status == 503 {
            "ServiceUnavailable"
        } else {
            "InternalServerError"
        };
        (
            "application/x-amz-json-1.0",
            format!(
                r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}","message":"injected by the chaos proxy"}}"#
            ),
        )
    } else {
        let (code, message) = if status == 503 {
            ("SlowDown", "Please reduce your request rate.")
        } else {
            (
                "InternalError",
                "We encountered an internal error. Please try again.",
            )
        };
        (
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>CHAOS{}</RequestId><HostId>chaos-proxy</HostId></Error>",
                info.index
            ),
        )
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nx-amz-request-id: CHAOS{}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        info.index
    )
    .into_bytes()
}

async fn serve(mut client: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::with_capacity(8192);
    let Some(head_end) = read_head(&mut client, &mut buf).await else {
        return;
    };
    let index = shared.next_index.fetch_add(1, Ordering::SeqCst);
    let mut info = parse_request(index, &buf[..head_end]);
    // A DynamoDB call is decided on its body too (which item, which update).
    if info.is_json_protocol()
        && let Some(len) = content_length(&buf[..head_end]).filter(|&l| l <= MAX_JSON_BODY)
    {
        let mut chunk = [0u8; 8192];
        while buf.len() < head_end + len {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        info.body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    }
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let action = {
        let mut holding = shared.holding.lock().unwrap();
        let action = if *holding {
            Action::Hold
        } else {
            (shared.schedule.lock().unwrap())(&info)
        };
        if action == Action::Hold {
            *holding = true;
        }
        action
    };
    if action != Action::Pass {
        shared
            .log
            .lock()
            .unwrap()
            .push(format!("#{index} {}: {action}", info.call()));
    }
    let forwarded = matches!(action, Action::Pass | Action::Delay(_) | Action::DropAfter);
    if forwarded {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
    }
    match action {
        Action::Pass => forward(client, &buf, head_end, &shared, false).await,
        Action::Delay(d) => {
            shared.stats.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(d).await;
            forward(client, &buf, head_end, &shared, false).await;
        }
        Action::DropAfter => {
            shared.stats.dropped_after.fetch_add(1, Ordering::Relaxed);
            forward(client, &buf, head_end, &shared, true).await;
        }
        Action::DropBefore => {
            shared.stats.dropped_before.fetch_add(1, Ordering::Relaxed);
            reset(client);
        }
        Action::Error(status) => {
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            let _ = client.write_all(&error_answer(status, &info)).await;
            let _ = client.shutdown().await;
            // Let the client finish sending its body, so it reads the answer, not a reset.
            let mut sink = [0u8; 8192];
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        Action::Hold => {
            shared.stats.held.fetch_add(1, Ordering::Relaxed);
            let mut released = shared.released.subscribe();
            shared.held.notify_waiters();
            let _ = released.changed().await;
            reset(client);
        }
    }
    if forwarded {
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes the connection with a reset (no FIN): the client sees a dropped connection.
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

/// Forwards one request to moto and relays its answer (or, with `lose_answer`, waits for the
/// whole answer and then resets the client's connection instead).
async fn forward(
    mut client: TcpStream,
    buf: &[u8],
    head_end: usize,
    shared: &Shared,
    lose_answer: bool,
) {
    let Ok(mut upstream) = TcpStream::connect(shared.upstream).await else {
        reset(client);
        return;
    };
    let _ = upstream.set_nodelay(true);
    let mut first = closing(&buf[..head_end]);
    first.extend_from_slice(&buf[head_end..]);
    if upstream.write_all(&first).await.is_err() {
        reset(client);
        return;
    }
    let relayed = {
        let (mut client_read, mut client_write) = client.split();
        let (mut up_read, mut up_write) = upstream.split();
        // The rest of the request body, for as long as the client sends.
        let upload = async {
            let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
            std::future::pending::<()>().await
        };
        let download = async {
            let mut answer = Vec::with_capacity(8192);
            loop {
                let end = read_head(&mut up_read, &mut answer).await?;
                let informational = answer.starts_with(b"HTTP/1.1 1") && end > 0;
                if informational && !lose_answer {
                    // 100 Continue: relay as is and read the final answer.
                    client_write.write_all(&answer[..end]).await.ok()?;
                    answer.drain(..end);
                    continue;
                }
                if informational {
                    answer.drain(..end);
                    continue;
                }
                if lose_answer {
                    // Moto applied the request; read its answer to the end and lose it.
                    let mut rest = Vec::new();
                    let _ = up_read.read_to_end(&mut rest).await;
                    return Some(());
                }
                let mut out = closing(&answer[..end]);
                out.extend_from_slice(&answer[end..]);
                client_write.write_all(&out).await.ok()?;
                tokio::io::copy(&mut up_read, &mut client_write)
                    .await
                    .ok()?;
                client_write.shutdown().await.ok()?;
                return Some(());
            }
        };
        tokio::select! {
            r = download => r,
            _ = upload => None,
        }
    };
    if lose_answer || relayed.is_none() {
        reset(client);
    }
}

/// An SDK configuration that reaches moto through `proxy`, retrying as the SDK does by default.
pub async fn through(proxy: &Proxy) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(proxy.endpoint())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .retry_config(
            aws_config::retry::RetryConfig::standard()
                .with_initial_backoff(Duration::from_millis(20)),
        )
        .load()
        .await
}
