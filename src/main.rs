//! The `mixpanel-replicator` binary: the Lambda function when `AWS_LAMBDA_RUNTIME_API` is set,
//! the local command otherwise.
#![recursion_limit = "256"]
// Unsafe code is refused but for one call into glibc (`bound_malloc_arenas`).
#![deny(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lambda_runtime::{LambdaEvent, service_fn};
use mixpanel_replicator::app::App;
use mixpanel_replicator::cli::{self, Cli};
use mixpanel_replicator::config::{RunMode, Settings};
use mixpanel_replicator::handler;

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    bound_malloc_arenas();
    let lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    mixpanel_replicator::logging::init(lambda);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if lambda {
        runtime.block_on(run_lambda())
    } else {
        let cli = Cli::parse();
        runtime.block_on(cli::run(cli))
    }
}

/// Bounds glibc's malloc to as many arenas as a pass has worker threads (one per core, 1 to
/// 4). By default glibc opens up to eight per core as threads contend, and memory freed into
/// one arena serves no other: on the 10-day benchmark that held 7 to 10 MiB more at peak (a
/// third of the process) at no gain in speed (BENCHMARKS.md, "Ten days, zstd, and multi-day
/// requests").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn bound_malloc_arenas() {
    let arenas = mixpanel_replicator::run::export::workers();
    let arenas = libc::c_int::try_from(arenas).unwrap_or(1);
    // SAFETY: `mallopt` only sets a malloc parameter (under malloc's own lock); it is called
    // first in `main`, before any other thread exists, with a valid parameter and value. On
    // failure (0) malloc keeps its default, which is only more memory.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

async fn run_lambda() -> ExitCode {
    let settings = match Settings::from_env(RunMode::Lambda) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(kind = %e.kind(), "{e}");
            return ExitCode::FAILURE;
        }
    };
    let app = match App::build(settings, None).await {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::error!(kind = %e.kind(), "{e}");
            return ExitCode::FAILURE;
        }
    };
    let result = lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let app = app.clone();
        async move {
            let deadline = handler::effective_deadline(
                Some(event.context.deadline()),
                app.settings.time_budget,
            );
            // The summary line and EMF metrics (on stdout, where Lambda turns them into
            // CloudWatch metrics) of every invocation event (each record of an SQS event).
            handler::answer(&app, event.payload, deadline, true).await
        }
    }))
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("the Lambda runtime stopped: {e}");
            ExitCode::FAILURE
        }
    }
}
