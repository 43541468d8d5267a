//! Errors, typed by what a caller can do about them.

use std::fmt;

/// What a failure means for whoever invoked us: retry now, retry later, or fix something first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A setting is missing or malformed: fix the configuration.
    InvalidSetting,
    /// The invocation event is not one we accept: fix the event.
    InvalidEvent,
    /// Mixpanel rejected the credentials: fix the secret.
    Unauthorized,
    /// The Mixpanel plan does not include this API.
    PaymentRequired,
    /// Mixpanel's rate limit: retry later.
    RateLimited,
    /// A passing failure (5xx, network, a cut or `terminated early` body): retry.
    Transient,
    /// Mixpanel answered something we cannot use (4xx other than auth, garbage body).
    BadResponse,
    /// The credentials secret could not be read or has the wrong shape.
    Secret,
    /// Object storage (S3 or the local folder) failed.
    Storage,
    /// The state store (DynamoDB or the local state file) failed.
    State,
    /// The invocation ran out of time; progress was saved.
    Deadline,
    /// A re-read came back with far fewer rows than the commit it would replace
    /// (`SHRINK_GUARD_PERCENT`): not committed until a person forces it.
    Shrunk,
}

impl ErrorKind {
    /// Name used in logs, responses and Lambda's `errorType`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidSetting => "InvalidSetting",
            ErrorKind::InvalidEvent => "InvalidEvent",
            ErrorKind::Unauthorized => "Unauthorized",
            ErrorKind::PaymentRequired => "PaymentRequired",
            ErrorKind::RateLimited => "RateLimited",
            ErrorKind::Transient => "Transient",
            ErrorKind::BadResponse => "BadResponse",
            ErrorKind::Secret => "Secret",
            ErrorKind::Storage => "Storage",
            ErrorKind::State => "State",
            ErrorKind::Deadline => "Deadline",
            ErrorKind::Shrunk => "Shrunk",
        }
    }

    /// Whether trying the same thing again may succeed without a change by a person.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::RateLimited
                | ErrorKind::Transient
                | ErrorKind::Storage
                | ErrorKind::State
                | ErrorKind::Deadline
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What exactly happened, where a caller decides on more than the kind. Set where the failure
/// is first seen (an HTTP answer, an `io::Error`, an SDK error), so that no decision reads the
/// message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The slice's lease is another attempt's now: nothing this attempt wrote is committed.
    LeaseLost,
    /// A file system is full (the spill's temporary storage).
    NoSpace,
    /// Mixpanel answered with this HTTP status.
    Http(u16),
    /// Mixpanel refused a listing's session (it expired): the listing starts again.
    ExpiredSession,
    /// The AWS resource does not exist.
    NotFound,
    /// AWS refused the call: the role lacks a permission.
    AccessDenied,
    /// The deadline came while the parts of a slice were written.
    DeadlineWhileWriting,
}

/// The one error type of the replicator: a kind and a message that names the problem, what
/// exactly happened when a caller needs it, and the error it came from.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    cause: Option<Cause>,
    #[source]
    source: Option<std::sync::Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with a message for a person.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            cause: None,
            source: None,
        }
    }

    /// The same error, saying what exactly happened.
    pub fn with_cause(mut self, cause: Cause) -> Self {
        self.cause = Some(cause);
        self
    }

    /// The same error, keeping the error it came from (`source()`).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(std::sync::Arc::new(source));
        self
    }

    /// The same error, saying what exactly happened when that is known.
    pub fn with_cause_if(mut self, cause: Option<Cause>) -> Self {
        if cause.is_some() {
            self.cause = cause;
        }
        self
    }

    /// What exactly happened, when it was recorded.
    pub fn cause(&self) -> Option<Cause> {
        self.cause
    }

    /// A storage error from an `io::Error`, named by `what`; a full file system says so.
    pub fn io(what: impl fmt::Display, e: std::io::Error) -> Self {
        Error::from_io(format!("{what}: {e}"), e)
    }

    fn from_io(message: String, e: std::io::Error) -> Self {
        let full = (e.kind() == std::io::ErrorKind::StorageFull).then_some(Cause::NoSpace);
        Error::storage(message).with_source(e).with_cause_if(full)
    }

    /// A missing or malformed setting, named.
    pub fn setting(name: &str, reason: impl fmt::Display) -> Self {
        Error::new(ErrorKind::InvalidSetting, format!("{name}: {reason}"))
    }

    /// A rejected invocation event.
    pub fn event(reason: impl fmt::Display) -> Self {
        Error::new(ErrorKind::InvalidEvent, format!("invalid event: {reason}"))
    }

    /// A failure of the object store.
    pub fn storage(reason: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Storage, format!("storage: {reason}"))
    }

    /// A failure of the state store.
    pub fn state(reason: impl fmt::Display) -> Self {
        Error::new(ErrorKind::State, format!("state store: {reason}"))
    }

    /// A passing failure worth retrying.
    pub fn transient(reason: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Transient, reason.to_string())
    }

    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::from_io(e.to_string(), e)
    }
}

/// Result with the replicator's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for lambda_runtime::Diagnostic {
    fn from(e: Error) -> Self {
        lambda_runtime::Diagnostic {
            error_type: e.kind().as_str().to_string(),
            error_message: e.message().to_string(),
        }
    }
}

/// What an AWS SDK failure was, from its variant and the service's error code: a missing
/// resource, a refused permission, or nothing more specific.
pub fn sdk_cause<E>(
    err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<Cause>
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let code = err.as_service_error()?.code()?;
    match code {
        "ResourceNotFoundException"
        | "EntityNotFoundException"
        | "NoSuchBucket"
        | "NoSuchKey"
        | "AWS.SimpleQueueService.NonExistentQueue"
        | "QueueDoesNotExist" => Some(Cause::NotFound),
        "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation" => {
            Some(Cause::AccessDenied)
        }
        _ => None,
    }
}

/// A short account of an AWS SDK failure: the service's error code and message (and HTTP
/// status), or the chain of causes. (`DisplayErrorContext` would append the whole debug view:
/// headers, body and all.)
pub fn describe_sdk_error<E>(
    err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    if let Some(service) = err.as_service_error() {
        let mut text = service.code().unwrap_or("error").to_owned();
        if let Some(message) = service.message() {
            text.push_str(": ");
            text.push_str(message);
        }
        if let Some(response) = err.raw_response() {
            text.push_str(&format!(" (HTTP {})", response.status().as_u16()));
        }
        return text;
    }
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_keeps_its_source_and_a_full_disk_says_so() {
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let e = Error::io("spill file", full);
        assert_eq!(
            (e.kind(), e.cause()),
            (ErrorKind::Storage, Some(Cause::NoSpace))
        );
        assert!(std::error::Error::source(&e).is_some());
        let e: Error = std::io::Error::from_raw_os_error(28).into();
        assert_eq!(e.cause(), Some(Cause::NoSpace), "ENOSPC: {e}");
        let e = Error::io(
            "reading x",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(e.cause(), None);
        assert_eq!(Error::new(ErrorKind::State, "x").cause(), None);
    }
}
