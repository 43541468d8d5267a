//! Logs: JSON lines for Lambda (CloudWatch), readable lines on a terminal; always on stderr.

use tracing_subscriber::EnvFilter;

/// Sets up logging; `RUST_LOG` (or Lambda's `AWS_LAMBDA_LOG_LEVEL`) chooses the level.
pub fn init(json: bool) {
    let default = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .ok()
        .map(|l| l.to_ascii_lowercase())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,mixpanel_replicator={default}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let json = json
        || std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    if json {
        let _ = builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init();
    } else {
        // Colours only for a person at a terminal, not in a file or a pipe.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let _ = builder.compact().with_ansi(ansi).try_init();
    }
}
