//! mixpanel-replicator: replicates a Mixpanel project into Amazon S3 as gzip (or zstd) JSON Lines.
//!
//! The path of a record: the `mixpanel` client reads it, the table's module in [`tables`]
//! transforms it, the runner of its slice in [`run`] deduplicates it ([`run::spill`]) and
//! writes it through the [`sink::part`] writer to the [`sink`], and [`run::commit`] makes it
//! visible with its manifest and records it in the [`state`] store.
//!
//! Around that path: the entry points ([`handler`] for Lambda, [`cli`] for the command line,
//! with its demo when built with the simulator) call [`run`], which claims slices that
//! [`plan`] queues in the [`state`] store, under the shared request budget of `ratelimit`;
//! `fan_out` sends days to the fan-out queue. The shared domain types are `slice` and
//! `schema`. No module calls an entry point, and the top-level modules depend on each other
//! without cycles (checked by a test in [`run`]).
#![forbid(unsafe_code)]

pub mod app;
pub(crate) mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub(crate) mod fan_out;
pub mod handler;
pub mod logging;
pub mod metrics;
pub(crate) mod mixpanel;
pub(crate) mod park;
pub mod plan;
pub(crate) mod ratelimit;
pub(crate) mod retry;
pub mod run;
pub(crate) mod schema;
pub mod secrets;
pub mod sink;
pub(crate) mod skip;
pub(crate) mod slice;
pub mod state;
pub mod tables;
