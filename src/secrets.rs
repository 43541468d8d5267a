//! Mixpanel credentials: from the environment (local) or AWS Secrets Manager (Lambda), cached
//! across warm invocations for a short time so that a rotated secret is picked up.

use std::fmt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The value, for building the Authorization header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Credentials for Mixpanel's APIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// A project API secret (HTTP Basic, secret as user, empty password).
    ApiSecret(Secret),
    /// A service account (HTTP Basic user:secret, plus `project_id` on every request).
    ServiceAccount {
        /// User name, e.g. `name.abc123.mp-service-account`.
        username: String,
        /// The account's secret.
        secret: Secret,
        /// The project to read.
        project_id: u64,
    },
}

impl Credentials {
    /// Project API secret credentials.
    pub fn api_secret(s: impl Into<String>) -> Self {
        Credentials::ApiSecret(Secret::new(s))
    }

    /// Service account credentials.
    pub fn service_account(
        username: impl Into<String>,
        secret: impl Into<String>,
        project_id: u64,
    ) -> Self {
        Credentials::ServiceAccount {
            username: username.into(),
            secret: Secret::new(secret),
            project_id,
        }
    }

    /// The `Authorization` header value.
    pub fn authorization(&self) -> String {
        let raw = match self {
            Credentials::ApiSecret(s) => format!("{}:", s.expose()),
            Credentials::ServiceAccount {
                username, secret, ..
            } => format!("{username}:{}", secret.expose()),
        };
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// The `project_id` query parameter service accounts must send.
    pub fn project_id(&self) -> Option<u64> {
        match self {
            Credentials::ApiSecret(_) => None,
            Credentials::ServiceAccount { project_id, .. } => Some(*project_id),
        }
    }

    /// Every secret string, so that output can be checked never to contain one.
    pub fn secret_values(&self) -> Vec<&str> {
        match self {
            Credentials::ApiSecret(s) => vec![s.expose()],
            Credentials::ServiceAccount { secret, .. } => vec![secret.expose()],
        }
    }

    /// Parses a Secrets Manager secret string: `{"api_secret": ...}`,
    /// `{"username", "secret", "project_id"}`, or a bare API secret. Errors never quote the value.
    pub fn from_secret_string(s: &str) -> Result<Credentials> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::Secret,
                format!("the Mixpanel credentials secret {why}"),
            )
        };
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(bad("is empty"));
        }
        if !trimmed.starts_with(['{', '"', '[']) {
            if trimmed.chars().any(char::is_whitespace) {
                return Err(bad(
                    "is neither JSON nor a bare API secret (it contains white space)",
                ));
            }
            return Ok(Credentials::api_secret(trimmed));
        }
        let v: Value = serde_json::from_str(trimmed).map_err(|_| bad("is not valid JSON"))?;
        match v {
            Value::String(s) if !s.trim().is_empty() => Ok(Credentials::api_secret(s.trim())),
            Value::Object(m) => {
                let text = |k: &str| {
                    m.get(k)
                        .and_then(Value::as_str)
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                };
                if let Some(api) = text("api_secret") {
                    return Ok(Credentials::api_secret(api));
                }
                match (text("username"), text("secret")) {
                    (Some(u), Some(sec)) => {
                        let project_id = match m.get("project_id") {
                            Some(Value::Number(n)) => n.as_u64(),
                            Some(Value::String(s)) => s.trim().parse().ok(),
                            _ => None,
                        }
                        .ok_or_else(|| {
                            bad("has a username and secret but no numeric project_id")
                        })?;
                        Ok(Credentials::service_account(u, sec, project_id))
                    }
                    _ => Err(bad(
                        "has neither an \"api_secret\" nor \"username\", \"secret\" and \"project_id\"",
                    )),
                }
            }
            _ => Err(bad("is JSON but not an object or a string")),
        }
    }
}

/// Where credentials come from.
#[derive(Clone, Debug)]
pub enum CredentialsSource {
    /// Given in the environment.
    Static(Credentials),
    /// Read from AWS Secrets Manager.
    SecretsManager {
        /// The secret's id or ARN.
        secret_id: String,
    },
}

/// How long a secret read from Secrets Manager is reused.
pub const SECRET_TTL: Duration = Duration::from_secs(300);

/// Gives credentials, reading Secrets Manager at most once per [`SECRET_TTL`].
pub struct CredentialsProvider {
    source: CredentialsSource,
    client: Option<aws_sdk_secretsmanager::Client>,
    cached: Mutex<Option<(Credentials, Instant)>>,
}

impl CredentialsProvider {
    /// A provider for `source`; `client` is needed for Secrets Manager.
    pub fn new(source: CredentialsSource, client: Option<aws_sdk_secretsmanager::Client>) -> Self {
        CredentialsProvider {
            source,
            client,
            cached: Mutex::new(None),
        }
    }

    /// Current credentials.
    pub async fn get(&self) -> Result<Credentials> {
        let secret_id = match &self.source {
            CredentialsSource::Static(c) => return Ok(c.clone()),
            CredentialsSource::SecretsManager { secret_id } => secret_id,
        };
        let mut cached = self.cached.lock().await;
        if let Some((c, at)) = cached.as_ref()
            && at.elapsed() < SECRET_TTL
        {
            return Ok(c.clone());
        }
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Secret, "no Secrets Manager client configured"))?;
        let out = client
            .get_secret_value()
            .secret_id(secret_id)
            .send()
            .await
            .map_err(|e| {
                let detail = crate::error::describe_sdk_error(&e);
                let cause = crate::error::sdk_cause(&e);
                // A secret that is not there, or that the role may not read, stays so.
                let kind = if cause.is_some() {
                    ErrorKind::Secret
                } else {
                    ErrorKind::Transient
                };
                Error::new(
                    kind,
                    format!("cannot read the Mixpanel credentials secret {secret_id:?}: {detail}"),
                )
                .with_source(e)
                .with_cause_if(cause)
            })?;
        let text = out.secret_string().ok_or_else(|| {
            Error::new(ErrorKind::Secret, format!("the secret {secret_id:?} has no string value (binary secrets are not supported)"))
        })?;
        let creds = Credentials::from_secret_string(text)?;
        *cached = Some((creds.clone(), Instant::now()));
        Ok(creds)
    }

    /// Forgets the cached secret (after Mixpanel rejected it: it may have been rotated).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_shapes() {
        assert_eq!(
            Credentials::from_secret_string("abc123").unwrap(),
            Credentials::api_secret("abc123")
        );
        assert_eq!(
            Credentials::from_secret_string("\"abc123\"").unwrap(),
            Credentials::api_secret("abc123")
        );
        assert_eq!(
            Credentials::from_secret_string(r#"{"api_secret": "abc"}"#).unwrap(),
            Credentials::api_secret("abc")
        );
        assert_eq!(
            Credentials::from_secret_string(
                r#"{"username": "u", "secret": "s", "project_id": 12345}"#
            )
            .unwrap(),
            Credentials::service_account("u", "s", 12345)
        );
        assert_eq!(
            Credentials::from_secret_string(
                r#"{"username": "u", "secret": "s", "project_id": "12345"}"#
            )
            .unwrap(),
            Credentials::service_account("u", "s", 12345)
        );
    }

    #[test]
    fn wrong_shapes_are_named_without_the_value() {
        for s in [
            "",
            "{not json",
            r#"{"user": "topsecretvalue"}"#,
            r#"{"username": "u", "secret": "topsecretvalue"}"#,
            "[1]",
            "top secret value",
        ] {
            let e = Credentials::from_secret_string(s).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Secret);
            assert!(
                !e.to_string().contains("topsecretvalue") && !e.to_string().contains("top secret"),
                "{e}"
            );
        }
    }

    #[test]
    fn authorization_header_forms() {
        assert_eq!(
            Credentials::api_secret("abc").authorization(),
            "Basic YWJjOg=="
        );
        assert_eq!(
            Credentials::service_account("u", "s", 1).authorization(),
            "Basic dTpz"
        );
        assert!(!format!("{:?}", Credentials::api_secret("abc")).contains("abc"));
    }
}
