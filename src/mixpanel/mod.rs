//! Mixpanel HTTP client: hosts, authentication, retries with backoff, error classification.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use crate::error::{Cause, Error, ErrorKind, Result};
use crate::ratelimit::{Family, Permit, RequestBudget};
use crate::retry::{Decision, Policy};
use crate::secrets::CredentialsProvider;

/// Counters of what the client did, for the invocation summary.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests retried.
    pub retries: AtomicU64,
    /// HTTP 429 answers.
    pub rate_limited: AtomicU64,
}

pub use crate::tables::export::ExportQuery;

/// The client; cheap to clone.
#[derive(Clone)]
pub struct MixpanelClient {
    http: reqwest::Client,
    api_url: String,
    data_url: String,
    credentials: Arc<CredentialsProvider>,
    stats: Arc<RequestStats>,
    base_backoff: Duration,
    budget: Option<Arc<RequestBudget>>,
}

/// An export response whose body holds a slot of the shared request budget until it is read.
pub struct ExportResponse {
    resp: reqwest::Response,
    permit: Option<Permit>,
}

impl ExportResponse {
    /// The body as a stream of chunks (gunzipped); the budget slot is given back when the
    /// stream is dropped.
    pub fn bytes_stream(
        self,
    ) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static {
        use futures_util::StreamExt;
        let permit = self.permit;
        self.resp.bytes_stream().map(move |chunk| {
            let _held = &permit;
            chunk
        })
    }
}

/// Whether a base URL is one TLS is needed for: anything but `http://`.
fn needs_tls(url: &str) -> bool {
    !url.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
}

/// A plain-HTTP client sent on to another scheme (the scheme and host it was sent to).
#[derive(Debug, thiserror::Error)]
#[error(
    "the server redirected a plain-HTTP request to {0}; set MIXPANEL_API_URL and \
     MIXPANEL_DATA_URL to its https:// URLs"
)]
struct PlainHttpRedirected(String);

/// Redirects of a plain-HTTP client: followed (up to ten, as reqwest's default) while they
/// stay plain HTTP; one to HTTPS is an error naming the host, never its path or query.
fn plain_http_redirect(attempt: reqwest::redirect::Attempt<'_>) -> reqwest::redirect::Action {
    let url = attempt.url();
    if url.scheme() != "http" {
        let to = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
        return attempt.error(PlainHttpRedirected(to));
    }
    if attempt.previous().len() >= 10 {
        return attempt.error("too many redirects");
    }
    attempt.follow()
}

impl MixpanelClient {
    /// A client for the given base URLs.
    pub fn new(
        api_url: &str,
        data_url: &str,
        credentials: Arc<CredentialsProvider>,
    ) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Large exports may think for minutes before the first byte; a stalled read beyond
            // this is a broken connection.
            .read_timeout(Duration::from_secs(300))
            .user_agent(concat!("mixpanel-replicator/", env!("CARGO_PKG_VERSION")));
        if !needs_tls(api_url) && !needs_tls(data_url) {
            // Both base URLs are plain HTTP (a local simulator, a proxy on loopback): the
            // system's CA store, which takes 10 to 20 ms to load, is not read. Such a client
            // trusts no certificate, so a redirect to HTTPS (Mixpanel's answer to `http://`)
            // fails at once, saying which settings to change.
            builder = builder
                .tls_certs_only(std::iter::empty())
                .redirect(reqwest::redirect::Policy::custom(plain_http_redirect));
        }
        let http = builder.build().map_err(|e| {
            Error::new(
                ErrorKind::InvalidSetting,
                format!("cannot build the HTTP client: {e}"),
            )
        })?;
        Ok(MixpanelClient {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            data_url: data_url.trim_end_matches('/').to_string(),
            credentials,
            stats: Arc::new(RequestStats::default()),
            base_backoff: Duration::from_millis(500),
            budget: None,
        })
    }

    /// Takes every request from the shared budget.
    pub fn with_budget(mut self, budget: Arc<RequestBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The same client without the shared budget: its requests are neither paced nor recorded
    /// in the state store (`check`, which writes nothing and asks a handful).
    pub fn without_budget(&self) -> Self {
        let mut c = self.clone();
        c.budget = None;
        c
    }

    /// Shortens backoff between retries (tests against the simulator).
    pub fn with_base_backoff(mut self, d: Duration) -> Self {
        self.base_backoff = d;
        self
    }

    /// The counters of this client.
    pub fn stats(&self) -> &RequestStats {
        &self.stats
    }

    /// The export endpoint's URL.
    pub fn export_url(&self) -> String {
        format!("{}/api/2.0/export", self.data_url)
    }

    /// A query API endpoint's URL (`path` like `cohorts/list`).
    pub fn query_url(&self, path: &str) -> String {
        format!("{}/api/2.0/{}", self.api_url, path.trim_start_matches('/'))
    }

    /// The query parameters of an export request (service accounts add `project_id`).
    pub fn export_params(
        &self,
        q: &ExportQuery,
        project_id: Option<u64>,
    ) -> Vec<(&'static str, String)> {
        let mut p = vec![
            ("from_date", q.from_date.to_string()),
            ("to_date", q.to_date.to_string()),
        ];
        if let Some(ev) = &q.events {
            p.push(("event", serde_json::Value::from(ev.clone()).to_string()));
        }
        if let Some(w) = &q.where_clause {
            p.push(("where", w.clone()));
        }
        if let Some(id) = project_id {
            p.push(("project_id", id.to_string()));
        }
        p
    }

    /// Starts a raw export and returns the response once its status is 200. A 429 waits for
    /// the shared budget's next slot as long as `deadline` allows; any other failure, and no
    /// answer within `first_byte` of sending, is returned at once (the caller decides whether
    /// the request is too heavy).
    pub async fn export(
        &self,
        q: &ExportQuery,
        first_byte: Duration,
        deadline: Instant,
    ) -> Result<ExportResponse> {
        let url = self.export_url();
        let (resp, permit) = self
            .send(
                &url,
                "/api/2.0/export",
                Family::Export,
                Some(first_byte),
                deadline,
                |project_id| {
                    self.export_params(q, project_id)
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect()
                },
            )
            .await?;
        Ok(ExportResponse { resp, permit })
    }

    /// Calls a query API endpoint (`path` like `engage` or `cohorts/list`) and returns its
    /// whole body, with the same retries as [`Self::export`].
    pub async fn query(
        &self,
        path: &str,
        params: &[(&str, String)],
        deadline: Instant,
    ) -> Result<bytes::Bytes> {
        let url = self.query_url(path);
        let shown = format!("/api/2.0/{}", path.trim_start_matches('/'));
        self.query_at(&url, &shown, params, deadline).await
    }

    /// Calls the App API (`/api/app/projects/{id}/...`) on the query host.
    pub async fn app_api(
        &self,
        path: &str,
        params: &[(&str, String)],
        deadline: Instant,
    ) -> Result<bytes::Bytes> {
        let url = format!("{}/api/app/{}", self.api_url, path.trim_start_matches('/'));
        let shown = format!("/api/app/{}", path.trim_start_matches('/'));
        self.query_at(&url, &shown, params, deadline).await
    }

    async fn query_at(
        &self,
        url: &str,
        shown: &str,
        params: &[(&str, String)],
        deadline: Instant,
    ) -> Result<bytes::Bytes> {
        // A query answer slower than the deadline must not hold the invocation past it.
        tokio::time::timeout_at(deadline, self.query_until(url, shown, params, deadline))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Deadline,
                    format!("the invocation's deadline came before {shown} answered; the work stays pending"),
                )
            })?
    }

    async fn query_until(
        &self,
        url: &str,
        shown: &str,
        params: &[(&str, String)],
        deadline: Instant,
    ) -> Result<bytes::Bytes> {
        let (resp, permit) = self
            .send(url, shown, Family::Query, None, deadline, |project_id| {
                let mut p: Vec<(String, String)> = params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                if let Some(id) = project_id {
                    p.push(("project_id".to_string(), id.to_string()));
                }
                p
            })
            .await?;
        let body = resp.bytes().await.map_err(|e| {
            Error::transient(format!(
                "the answer of {shown} broke off: {}",
                without_url(&e)
            ))
        });
        if let Some(p) = permit {
            p.release().await;
        }
        body
    }

    /// Current credentials (for callers that need the service account's project id).
    pub async fn credentials(&self) -> Result<crate::secrets::Credentials> {
        self.credentials.get().await
    }

    /// The credentials as their source has them now, not as cached (`check` on a warm
    /// function tests the secret as it is).
    pub async fn reload_credentials(&self) -> Result<crate::secrets::Credentials> {
        self.credentials.invalidate().await;
        self.credentials.get().await
    }

    /// Sends a GET until it answers 200, retrying 429 (and for queries 5xx and network
    /// failures) under [`Policy::MIXPANEL`]. With `first_byte`, an answer slower than that
    /// after sending is a transient failure.
    async fn send(
        &self,
        url: &str,
        shown: &str,
        family: Family,
        first_byte: Option<Duration>,
        deadline: Instant,
        params: impl Fn(Option<u64>) -> Vec<(String, String)>,
    ) -> Result<(reqwest::Response, Option<Permit>)> {
        Policy::MIXPANEL
            .with_first_delay(self.base_backoff)
            .run(
                Some(deadline),
                |_| self.send_once(url, shown, family, first_byte, deadline, &params),
                |failed, _| {
                    if failed.last {
                        return Decision::GiveUp;
                    }
                    // An export that fails otherwise (5xx, `Timeout Error`, a broken
                    // connection) is Mixpanel's sign of a day too heavy to export at once: the
                    // caller counts it and splits the request rather than sending the same one
                    // again here.
                    let retries = matches!(
                        (family, failed.err.kind()),
                        (_, ErrorKind::RateLimited) | (Family::Query, ErrorKind::Transient)
                    );
                    if !retries {
                        Decision::GiveUp
                    } else if failed.err.kind() == ErrorKind::RateLimited && self.budget.is_some() {
                        // The budget holds every request back until the slot (acquired by the
                        // next attempt).
                        Decision::RetryAtOnce
                    } else if let Some(wait) = failed.retry_after {
                        Decision::RetryAfter(wait)
                    } else {
                        Decision::Retry
                    }
                },
                |failed, attempt, wait| {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if let Some(wait) = wait {
                        tracing::warn!(attempt, wait_ms = wait.as_millis() as u64, error = %failed.err, "retrying a Mixpanel request");
                    }
                },
            )
            .await
            .map_err(|failed| failed.err)
    }

    /// One attempt of [`MixpanelClient::send`].
    async fn send_once(
        &self,
        url: &str,
        shown: &str,
        family: Family,
        first_byte: Option<Duration>,
        deadline: Instant,
        params: &impl Fn(Option<u64>) -> Vec<(String, String)>,
    ) -> std::result::Result<(reqwest::Response, Option<Permit>), Failed> {
        let creds = self.credentials.get().await.map_err(Failed::last)?;
        // Every attempt is a request Mixpanel counts: each takes from the shared budget.
        let permit = match &self.budget {
            Some(b) => Some(b.acquire(family, deadline).await.map_err(Failed::last)?),
            None => None,
        };
        let query = params(creds.project_id());
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let request = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, creds.authorization())
            .header(reqwest::header::ACCEPT_ENCODING, "gzip")
            .query(&query)
            .send();
        let sent = match first_byte {
            Some(wait) => tokio::time::timeout(wait, request).await.ok(),
            None => Some(request.await),
        };
        let Some(sent) = sent else {
            return Err(Failed::last(Error::transient(format!(
                "Mixpanel sent no answer to {shown} for {:.0} s",
                first_byte.unwrap_or_default().as_secs_f64()
            ))));
        };
        match sent {
            Ok(resp) if resp.status() == StatusCode::OK => Ok((resp, permit)),
            Ok(resp) => {
                let status = resp.status();
                let retry_after = retry_after(&resp);
                let body = read_error_body(resp).await;
                let err = classify(status, &body, shown);
                if err.kind() == ErrorKind::Unauthorized {
                    // A rotated secret is picked up by the next invocation.
                    self.credentials.invalidate().await;
                }
                if status == StatusCode::TOO_MANY_REQUESTS {
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    if let Some(budget) = &self.budget {
                        // Every invocation now waits for the slot Mixpanel leaves; the
                        // next attempt's grant waits for it too (or gives up).
                        let until = budget
                            .rate_limited(family, retry_after)
                            .await
                            .map_err(Failed::last)?;
                        tracing::warn!(
                            path = shown,
                            blocked_until_ms = until,
                            "Mixpanel rate limit: requests wait for the budget's next free slot"
                        );
                    }
                }
                Err(Failed {
                    err,
                    retry_after,
                    last: false,
                })
            }
            // A setting to change, not a fault to wait out: no other attempt.
            Err(e) if redirected_off_plain_http(&e) => Err(Failed::last(Error::new(
                ErrorKind::InvalidSetting,
                format!("request to {shown} failed: {}", without_url(&e)),
            ))),
            Err(e) => Err(Failed {
                err: Error::transient(format!("request to {shown} failed: {}", without_url(&e))),
                retry_after: None,
                last: false,
            }),
        }
    }
}

/// Whether `e` is a plain-HTTP client's refusal of a redirect to HTTPS.
fn redirected_off_plain_http(e: &reqwest::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        if inner.is::<PlainHttpRedirected>() {
            return true;
        }
        src = inner.source();
    }
    false
}

/// A failed attempt of a request.
struct Failed {
    err: Error,
    /// Mixpanel's `Retry-After`.
    retry_after: Option<Duration>,
    /// Not worth another attempt whatever its kind (the credentials, the budget, no first
    /// byte).
    last: bool,
}

impl Failed {
    fn last(err: Error) -> Failed {
        Failed {
            err,
            retry_after: None,
            last: true,
        }
    }
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(3600)))
}

async fn read_error_body(resp: reqwest::Response) -> String {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > 16 * 1024 {
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// Mixpanel's `{"error": "..."}` message, or a short excerpt of the body.
fn error_message(body: &str) -> String {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(body)
        && let Some(e) = v.get("error").and_then(|e| e.as_str())
    {
        return e.to_string();
    }
    let excerpt: String = body.trim().chars().take(200).collect();
    if excerpt.is_empty() {
        "empty body".into()
    } else {
        excerpt
    }
}

/// Turns a non-200 answer into an error whose kind says what can be done.
pub fn classify(status: StatusCode, body: &str, path: &str) -> Error {
    let msg = error_message(body);
    let code = status.as_u16();
    let error = match code {
        401 | 403 => Error::new(
            ErrorKind::Unauthorized,
            format!(
                "Mixpanel rejected the credentials (HTTP {code} on {path}: {msg}); check the API secret or service account and its project"
            ),
        ),
        400 if body.contains("Unable to authenticate") => Error::new(
            ErrorKind::Unauthorized,
            format!(
                "Mixpanel rejected the credentials (HTTP 400 on {path}: {msg}); check the API secret or service account"
            ),
        ),
        402 => Error::new(
            ErrorKind::PaymentRequired,
            format!("the Mixpanel plan does not allow {path} (HTTP 402: {msg})"),
        ),
        429 => Error::new(
            ErrorKind::RateLimited,
            format!("Mixpanel rate limit on {path} (HTTP 429: {msg})"),
        ),
        // The project lives in another data-residency cluster than the hosts asked.
        400 if msg.contains("for cluster") => Error::setting(
            "MIXPANEL_REGION",
            format!(
                "Mixpanel answered HTTP 400 on {path} ({msg}): the project is in another data-residency cluster; set MIXPANEL_REGION to its region (us, eu or in)"
            ),
        ),
        400 if msg.contains("Timeout Error") => {
            Error::transient(format!("Mixpanel timed out on {path} (HTTP 400: {msg})"))
        }
        500..=599 => Error::transient(format!(
            "Mixpanel server error on {path} (HTTP {code}: {msg})"
        )),
        _ => Error::new(
            ErrorKind::BadResponse,
            format!("Mixpanel answered HTTP {code} on {path}: {msg}"),
        ),
    };
    // A paged listing whose session Mixpanel no longer knows (`engage` pages): the one
    // decision taken on the answer's words, here where the answer is read.
    let expired_session = error.kind() == ErrorKind::BadResponse
        && (400..500).contains(&code)
        && msg.to_ascii_lowercase().contains("session");
    error.with_cause(if expired_session {
        Cause::ExpiredSession
    } else {
        Cause::Http(code)
    })
}

/// A reqwest error without its URL (which carries query parameters).
pub fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), url.path());
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_base_urls_go_without_tls() {
        assert!(!needs_tls("http://127.0.0.1:8080"));
        assert!(!needs_tls("HTTP://localhost/"));
        assert!(needs_tls("https://data.mixpanel.com"));
        assert!(needs_tls("https://127.0.0.1:8443"));
        // Anything not plainly HTTP keeps the system's roots.
        assert!(needs_tls("httpx://example.com"));
        assert!(needs_tls(""));
    }

    #[test]
    fn classification() {
        let c = |code: u16, body: &str| {
            classify(StatusCode::from_u16(code).unwrap(), body, "/x").kind()
        };
        assert_eq!(
            c(401, r#"{"error":"Invalid credentials"}"#),
            ErrorKind::Unauthorized
        );
        assert_eq!(c(403, ""), ErrorKind::Unauthorized);
        assert_eq!(
            c(400, "Unable to authenticate request"),
            ErrorKind::Unauthorized
        );
        assert_eq!(
            c(402, r#"{"error":"Your plan does not allow API calls."}"#),
            ErrorKind::PaymentRequired
        );
        assert_eq!(c(429, "{}"), ErrorKind::RateLimited);
        assert_eq!(c(503, "oops"), ErrorKind::Transient);
        assert_eq!(
            c(400, r#"{"error":"Timeout Error."}"#),
            ErrorKind::Transient
        );
        assert_eq!(
            c(400, r#"{"error":"to_date cannot be later than today"}"#),
            ErrorKind::BadResponse
        );
    }

    #[test]
    fn the_answer_says_what_exactly_happened_once_for_every_caller() {
        let cause = |code: u16, body: &str| {
            classify(StatusCode::from_u16(code).unwrap(), body, "/x").cause()
        };
        assert_eq!(cause(400, r#"{"error":"bad"}"#), Some(Cause::Http(400)));
        let wrong_cluster = classify(
            StatusCode::BAD_REQUEST,
            r#"{"error":"request failed with error: invalid project id for cluster."}"#,
            "/api/2.0/export",
        );
        assert_eq!(wrong_cluster.kind(), ErrorKind::InvalidSetting);
        assert!(
            wrong_cluster.to_string().starts_with("MIXPANEL_REGION: Mixpanel answered HTTP 400 on /api/2.0/export (request failed with error: invalid project id for cluster.): the project is in another data-residency cluster"),
            "{wrong_cluster}"
        );
        assert_eq!(
            cause(400, r#"{"error":"Timeout Error."}"#),
            Some(Cause::Http(400))
        );
        assert_eq!(cause(503, ""), Some(Cause::Http(503)));
        assert_eq!(
            cause(
                400,
                r#"{"error":"Invalid session_id, it may have expired"}"#
            ),
            Some(Cause::ExpiredSession)
        );
        assert_eq!(cause(410, "Session expired"), Some(Cause::ExpiredSession));
        // A rate limit or a refused credential that mentions a session is still that.
        assert_eq!(cause(429, "session"), Some(Cause::Http(429)));
        assert_eq!(cause(401, "session"), Some(Cause::Http(401)));
    }
}
