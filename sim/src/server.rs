//! The HTTP face of the simulator.

use std::io::{self, Write};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use tokio::sync::mpsc;

use crate::api::{self, Endpoint};
use crate::r#gen::{Filter, day_num};
use crate::query::{ExportParams, param, parse_date, parse_export};
use crate::{AuthKind, CHUNK, Fault, FaultRule, RequestRecord, SimConfig, Simulator};

/// The router: one handler so every request is logged the same way.
pub(crate) fn router(sim: Simulator) -> Router {
    Router::new().fallback(handle).with_state(sim)
}

async fn handle(State(sim): State<Simulator>, req: Request) -> Response {
    let at_ms = sim.inner.now_ms();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if path == "/_sim/health" {
        return (StatusCode::OK, "ok").into_response();
    }
    let mut query = parts.uri.query().unwrap_or("").to_string();
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let auth = auth_kind(&parts.headers, &sim.inner.config);
    let mut body_error = None;
    if parts.method == Method::POST {
        match axum::body::to_bytes(body, 1 << 20).await {
            Ok(form) if !form.is_empty() => {
                // The log keeps one parseable form: a JSON body is logged form-encoded.
                let (extra, logged) = if is_json(&parts.headers) {
                    match json_params(&form) {
                        Ok(p) => {
                            let encoded = form_urlencoded::Serializer::new(String::new())
                                .extend_pairs(&p)
                                .finish();
                            (p, encoded)
                        }
                        Err(e) => {
                            // Reported where parameters are checked (after auth and faults).
                            body_error = Some(e);
                            (Vec::new(), String::from_utf8_lossy(&form).into_owned())
                        }
                    }
                } else {
                    let p = form_urlencoded::parse(&form).into_owned().collect();
                    (p, String::from_utf8_lossy(&form).into_owned())
                };
                append(&mut query, &logged);
                params.extend(extra);
            }
            Ok(_) => {}
            Err(_) => {
                let mut rec = record(&parts.method, &path, &query, auth, at_ms);
                return finish(
                    &sim,
                    &mut rec,
                    json_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        None,
                        "request body too large",
                    ),
                );
            }
        }
    }
    let request = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let mut rec = record(&parts.method, &path, &query, auth, at_ms);
    let resp = respond(
        &sim,
        &mut rec,
        &parts.method,
        &parts.headers,
        &params,
        &request,
        body_error.as_deref(),
    )
    .await;
    finish(&sim, &mut rec, resp)
}

/// Appends `more` to a query string with a `&` between.
fn append(query: &mut String, more: &str) {
    if !query.is_empty() && !more.is_empty() {
        query.push('&');
    }
    query.push_str(more);
}

fn record(method: &Method, path: &str, query: &str, auth: AuthKind, at_ms: u64) -> RequestRecord {
    RequestRecord {
        method: method.as_str().to_string(),
        path: path.to_string(),
        query: query.to_string(),
        auth,
        status: 0,
        at_ms,
        faulted: false,
    }
}

fn finish(sim: &Simulator, rec: &mut RequestRecord, resp: Response) -> Response {
    rec.status = resp.status().as_u16();
    sim.inner.lock().requests.push(rec.clone());
    resp
}

async fn respond(
    sim: &Simulator,
    rec: &mut RequestRecord,
    method: &Method,
    headers: &HeaderMap,
    params: &[(String, String)],
    request: &str,
    body_error: Option<&str>,
) -> Response {
    let cfg = &sim.inner.config;
    let Some(ep) = Endpoint::parse(&rec.path) else {
        return json_error(
            StatusCode::NOT_FOUND,
            Some(request),
            "Not found: the simulator serves /api/2.0/export, the Query API under /api/2.0/ and \
             /api/query/, and /api/app/projects/{id}/annotations",
        );
    };
    let app = matches!(ep, Endpoint::AppAnnotations(_));
    if app && method != Method::GET {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            Some(request),
            "Method not allowed: use GET",
        );
    }
    if method != Method::GET && method != Method::POST {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            Some(request),
            "Method not allowed: use GET or POST",
        );
    }
    match rec.auth {
        AuthKind::Missing | AuthKind::Invalid => {
            let mut r = json_body(
                StatusCode::UNAUTHORIZED,
                r#"{"error": "Invalid credentials"}"#.to_string(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Mixpanel\""),
            );
            return r;
        }
        AuthKind::SecretNoColon | AuthKind::SecretWithColon if app => {
            return json_error(
                StatusCode::UNAUTHORIZED,
                None,
                "The App API requires a service account (HTTP Basic username:secret)",
            );
        }
        AuthKind::ServiceAccount if app => {
            let want = cfg.service_account.as_ref().map_or(0, |s| s.project_id);
            if let Endpoint::AppAnnotations(id) = &ep
                && id.parse::<u64>().ok() != Some(want)
            {
                return json_error(
                    StatusCode::FORBIDDEN,
                    Some(request),
                    &format!(
                        "Permission denied: this service account has no access to project {id}"
                    ),
                );
            }
        }
        AuthKind::ServiceAccount => {
            let want = cfg.service_account.as_ref().map_or(0, |s| s.project_id);
            match param(params, "project_id") {
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        Some(request),
                        "project_id is required when authenticating with a service account",
                    );
                }
                Some(p) if p.trim().parse::<u64>().ok() != Some(want) => {
                    return json_error(
                        StatusCode::FORBIDDEN,
                        Some(request),
                        &format!(
                            "Permission denied: this service account has no access to project_id {p}"
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        AuthKind::SecretNoColon | AuthKind::SecretWithColon => {}
    }
    if cfg.plan_excludes.iter().any(|n| n == ep.name()) {
        let r = api::status_error(
            402,
            "Your plan does not allow API calls. Upgrade at mixpanel.com/pricing",
        );
        return json_reply(r, false);
    }
    if let Some(limit) = cfg.rate_limit {
        let now = Instant::now();
        let mut st = sim.inner.lock();
        while st
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= limit.window)
        {
            st.window.pop_front();
        }
        if st.window.len() >= limit.requests as usize {
            let used = st.window.len() + 1;
            drop(st);
            return rate_limited(sim, request, used, None);
        }
        st.window.push_back(now);
    }
    let fault = take_fault(sim, &rec.path, params);
    rec.faulted = fault.is_some();
    let mut stream_fault = None;
    match fault {
        None => {}
        Some(Fault::RateLimited { retry_after_secs }) => {
            return rate_limited(sim, request, 0, retry_after_secs);
        }
        Some(Fault::ServerError { status }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return if matches!(status.as_u16(), 502..=504) {
                // Gateways answer in HTML, not JSON.
                let reason = status.canonical_reason().unwrap_or("Error");
                let html = format!(
                    "<html>\r\n<head><title>{s} {reason}</title></head>\r\n<body>\r\n<center><h1>{s} {reason}</h1></center>\r\n</body>\r\n</html>\r\n",
                    s = status.as_u16()
                );
                ([(header::CONTENT_TYPE, "text/html")], html)
                    .into_response()
                    .with_status(status)
            } else {
                json_error(status, Some(request), "Internal server error")
            };
        }
        Some(Fault::Status { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let ct = match body.trim_start().as_bytes().first() {
                Some(b'{') | Some(b'[') => "application/json",
                Some(b'<') => "text/html; charset=utf-8",
                _ => "text/plain; charset=utf-8",
            };
            return ([(header::CONTENT_TYPE, ct)], body)
                .into_response()
                .with_status(status);
        }
        Some(Fault::SlowFirstByte { delay }) => tokio::time::sleep(delay).await,
        Some(Fault::Held { gate }) => gate.hold().await,
        Some(
            f @ (Fault::TerminatedEarly { .. }
            | Fault::CutBody { .. }
            | Fault::SlowBody { .. }
            | Fault::HeldBody { .. }),
        ) => stream_fault = Some(f),
    }
    if let Some(e) = body_error {
        return json_error(StatusCode::BAD_REQUEST, Some(request), e);
    }
    if ep != Endpoint::Export {
        let reply = api::answer(sim, &ep, params, request);
        let gzip = wants_gzip(headers);
        return match stream_fault {
            Some(f)
                if reply.status == 200
                    && !matches!(f, Fault::SlowBody { .. } | Fault::HeldBody { .. }) =>
            {
                broken_json(reply.body, gzip, &f)
            }
            _ => json_reply(reply, gzip),
        };
    }
    let p = match parse_export(params) {
        Ok(p) => p,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, Some(request), &e),
    };
    if day_num(p.to) > sim.inner.today() {
        return json_error(
            StatusCode::BAD_REQUEST,
            Some(request),
            "to_date cannot be later than today",
        );
    }
    stream_export(sim, p, wants_gzip(headers), stream_fault)
}

trait WithStatus {
    fn with_status(self, s: StatusCode) -> Self;
}

impl WithStatus for Response {
    fn with_status(mut self, s: StatusCode) -> Response {
        *self.status_mut() = s;
        self
    }
}

/// Applies the first matching rule that has uses left (a rule for `/api/2.0/X` also matches
/// `/api/query/X`).
fn take_fault(sim: &Simulator, path: &str, params: &[(String, String)]) -> Option<Fault> {
    let from = param(params, "from_date").and_then(parse_date);
    let to = param(params, "to_date").and_then(parse_date).or(from);
    // The request's time range in export seconds: its days, narrowed by a `where` on `$time`.
    let range = match (from, to) {
        (Some(f), Some(t)) => {
            let (mut lo, mut hi) = (day_num(f) * 86_400, (day_num(t) + 1) * 86_400);
            if let Some((wlo, whi)) =
                param(params, "where").and_then(|w| crate::query::parse_where(w).ok())
            {
                lo = lo.max(wlo);
                hi = hi.min(whi.saturating_add(1));
            }
            Some((lo, hi))
        }
        _ => None,
    };
    let span_secs = range.map(|(lo, hi)| (hi - lo).max(0) as u64);
    let canonical = Endpoint::canonical_path(path);
    let mut st = sim.inner.lock();
    let rule = st.faults.iter_mut().find(|r| {
        r.times > 0
            && (r.path == path || r.path == canonical)
            && r.from_date.is_none_or(|d| Some(d) == from)
            && r.covering
                .is_none_or(|d| from.is_some_and(|f| f <= d) && to.is_some_and(|t| d <= t))
            && r.wider_than
                .is_none_or(|w| span_secs.is_some_and(|s| s > w.as_secs()))
            && r.holding
                .is_none_or(|at| range.is_some_and(|(lo, hi)| lo <= at && at < hi))
            && r.param
                .as_deref()
                .is_none_or(|name| param(params, name).is_some_and(|v| !v.trim().is_empty()))
    })?;
    if rule.times != FaultRule::PERSISTENT {
        rule.times -= 1;
    }
    Some(rule.fault.clone())
}

fn rate_limited(sim: &Simulator, request: &str, used: usize, retry_after: Option<u64>) -> Response {
    let cfg = &sim.inner.config;
    let project = cfg.service_account.as_ref().map_or(1, |s| s.project_id);
    let (limit, window) = cfg
        .rate_limit
        .map_or((60, 3600), |r| (r.requests as usize, r.window.as_secs()));
    let used = if used == 0 { limit + 1 } else { used };
    let msg = format!(
        "Query rate limit exceeded for project_id: {project}. 0/100 queries running concurrently and {used}/{limit} queries running in the last {window} seconds. Please retry later."
    );
    let mut r = json_error(StatusCode::TOO_MANY_REQUESTS, Some(request), &msg);
    if let Some(secs) = retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

/// A JSON answer of a query endpoint, gzip-compressed when the client accepts it.
fn json_reply(reply: api::Reply, gzip: bool) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = if gzip {
        let mut resp = Response::new(Body::from(gzip_all(&reply.body)));
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        resp
    } else {
        Response::new(Body::from(reply.body))
    };
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.with_status(status)
}

fn gzip_all(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(data);
    gz.finish().unwrap_or_default()
}

/// A JSON answer broken by a stream fault: half of the (possibly compressed) body, then a
/// clean end (`TerminatedEarly`) or a broken connection (`CutBody`).
fn broken_json(body: Vec<u8>, gzip: bool, fault: &Fault) -> Response {
    let mut data = if gzip { gzip_all(&body) } else { body };
    data.truncate(data.len() / 2);
    let cut = matches!(fault, Fault::CutBody { .. });
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    tokio::spawn(async move {
        if tx.send(Ok(Bytes::from(data))).await.is_err() || !cut {
            return;
        }
        // As for the export: let the partial data reach the socket before the error.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while tx.capacity() < tx.max_capacity() && !tx.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let _ = tx
            .send(Err(io::Error::other(
                "mixpanel-sim: connection cut mid-body (injected fault)",
            )))
            .await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let v = v.split(';').next().unwrap_or("").trim();
            v.eq_ignore_ascii_case("application/json") || v.to_ascii_lowercase().ends_with("+json")
        })
}

/// The parameters of a JSON body: strings as they are, other values as JSON text.
fn json_params(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(o)) => Ok(o
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect()),
        Ok(_) => Err("a JSON body must be an object of parameters".into()),
        Err(e) => Err(format!("the JSON body is not valid JSON: {e}")),
    }
}

fn json_body(status: StatusCode, body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body)
        .into_response()
        .with_status(status)
}

/// Mixpanel's error shape: `{"request": "...", "error": "..."}`.
fn json_error(status: StatusCode, request: Option<&str>, error: &str) -> Response {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let body = match request {
        Some(r) => format!("{{\"request\": {}, \"error\": {}}}", q(r), q(error)),
        None => format!("{{\"error\": {}}}", q(error)),
    };
    json_body(status, body)
}

/// Classifies the Authorization header against the configured credentials.
pub(crate) fn auth_kind(headers: &HeaderMap, cfg: &SimConfig) -> AuthKind {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return AuthKind::Missing;
    };
    let Some((scheme, cred)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return AuthKind::Invalid;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return AuthKind::Invalid;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = b64
        .decode(cred.trim())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(cred.trim()));
    let Some(s) = raw.ok().and_then(|b| String::from_utf8(b).ok()) else {
        return AuthKind::Invalid;
    };
    if s == cfg.api_secret {
        AuthKind::SecretNoColon
    } else if s.strip_suffix(':') == Some(cfg.api_secret.as_str()) {
        AuthKind::SecretWithColon
    } else if cfg
        .service_account
        .as_ref()
        .is_some_and(|sa| s.split_once(':') == Some((sa.username.as_str(), sa.secret.as_str())))
    {
        AuthKind::ServiceAccount
    } else {
        AuthKind::Invalid
    }
}

fn wants_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            coding.eq_ignore_ascii_case("gzip") && q > 0.0
        })
}

type Chunk = Result<Bytes, io::Error>;

fn stream_export(sim: &Simulator, p: ExportParams, gzip: bool, fault: Option<Fault>) -> Response {
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let sim = sim.clone();
    tokio::task::spawn_blocking(move || produce(&sim, &p, gzip, fault, tx));
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

/// Hands body bytes to the response, compressing when asked.
struct Out {
    tx: mpsc::Sender<Chunk>,
    gz: Option<GzEncoder<Vec<u8>>>,
}

impl Out {
    /// False once the client is gone (or compression failed).
    fn send(&mut self, data: &[u8]) -> bool {
        match &mut self.gz {
            None => {
                data.is_empty()
                    || self
                        .tx
                        .blocking_send(Ok(Bytes::copy_from_slice(data)))
                        .is_ok()
            }
            Some(gz) => {
                if gz.write_all(data).is_err() {
                    return false;
                }
                let out = std::mem::take(gz.get_mut());
                out.is_empty() || self.tx.blocking_send(Ok(Bytes::from(out))).is_ok()
            }
        }
    }

    /// Sends what is compressed so far without ending the gzip stream.
    fn flush(&mut self) -> bool {
        match &mut self.gz {
            None => true,
            Some(gz) => {
                if gz.flush().is_err() {
                    return false;
                }
                let out = std::mem::take(gz.get_mut());
                out.is_empty() || self.tx.blocking_send(Ok(Bytes::from(out))).is_ok()
            }
        }
    }

    fn finish(self) {
        if let Some(gz) = self.gz {
            match gz.finish() {
                Ok(out) if !out.is_empty() => {
                    let _ = self.tx.blocking_send(Ok(Bytes::from(out)));
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = self.tx.blocking_send(Err(e));
                }
            }
        }
    }
}

/// Generates the body on a blocking thread, a chunk at a time.
fn produce(
    sim: &Simulator,
    p: &ExportParams,
    gzip: bool,
    fault: Option<Fault>,
    tx: mpsc::Sender<Chunk>,
) {
    let mut out = Out {
        tx: tx.clone(),
        gz: gzip.then(|| GzEncoder::new(Vec::new(), Compression::fast())),
    };
    let (early, cut) = match fault {
        Some(Fault::TerminatedEarly { after_lines }) => (Some(after_lines), None),
        Some(Fault::CutBody { after_lines }) => (None, Some(after_lines)),
        _ => (None, None),
    };
    let pace = match fault {
        Some(Fault::SlowBody { lines_per_second }) => Some(f64::from(lines_per_second.max(1))),
        _ => None,
    };
    let mut stall = match fault {
        Some(Fault::HeldBody { after_lines, gate }) => Some((after_lines, gate)),
        _ => None,
    };
    let began = Instant::now();
    let filter = Filter {
        names: sim.inner.generator.name_mask(p.events.as_deref()),
        export_lo: p.time_lo,
        export_hi: p.time_hi,
        time_in_ms: p.time_in_ms,
        truth: false,
    };
    let mut lines = 0usize;
    let mut terminated = false;
    let mut client_gone = false;
    let mut buf = Vec::with_capacity(CHUNK + 16 * 1024);
    let mut sink = |buf: &mut Vec<u8>, start: usize| -> bool {
        if early == Some(lines) {
            buf.truncate(start);
            buf.extend_from_slice(b"terminated early\n");
            terminated = true;
            return false;
        }
        if cut == Some(lines) {
            // Half a line: the client must not mistake this for a clean end.
            let half = (buf.len() - start) / 2;
            buf.truncate(start + half);
            return false;
        }
        if let Some((_, gate)) = stall.take_if(|(after, _)| *after == lines) {
            // The lines before this one reach the client; the rest waits for the gate.
            let line = buf.split_off(start);
            if !out.send(buf) || !out.flush() {
                client_gone = true;
                return false;
            }
            buf.clear();
            buf.extend_from_slice(&line);
            if !gate.hold_blocking(|| out.tx.is_closed()) {
                client_gone = true;
                return false;
            }
        }
        lines += 1;
        if let Some(rate) = pace {
            // Each line on its own, when its time comes (flushed through gzip too).
            let due = began + std::time::Duration::from_secs_f64(lines as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if !out.send(buf) || !out.flush() {
                client_gone = true;
                return false;
            }
            buf.clear();
        } else if buf.len() >= CHUNK {
            if !out.send(buf) {
                client_gone = true;
                return false;
            }
            buf.clear();
        }
        p.limit.is_none_or(|l| (lines as u64) < l)
    };
    let result = sim
        .inner
        .emit_range(day_num(p.from), day_num(p.to), &filter, &mut buf, &mut sink);
    if client_gone {
        return;
    }
    if let Err(e) = result {
        let _ = tx.blocking_send(Err(io::Error::other(e)));
        return;
    }
    if early.is_some() && !terminated {
        buf.extend_from_slice(b"terminated early\n");
    }
    if !out.send(&buf) {
        return;
    }
    if cut.is_some() {
        if out.flush() {
            // hyper discards its unflushed buffer when the body errors: let the partial data
            // reach the socket first, so the client sees some lines and then a broken body.
            let deadline = Instant::now() + std::time::Duration::from_secs(5);
            while tx.capacity() < tx.max_capacity() && !tx.is_closed() && Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            let _ = tx.blocking_send(Err(io::Error::other(
                "mixpanel-sim: connection cut mid-body (injected fault)",
            )));
        }
        return;
    }
    out.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_negotiation() {
        let mut h = HeaderMap::new();
        assert!(!wants_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("br, gzip;q=0.5"),
        );
        assert!(wants_gzip(&h));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip;q=0, identity"),
        );
        assert!(!wants_gzip(&h));
    }
}
