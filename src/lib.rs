//! mixpanel-replicator: replicates a Mixpanel project into Amazon S3 as gzip (or zstd) JSON Lines.
//!
//! The path of a record: [`mixpanel`] client → [`tables`] transform → [`sink::part`] writer →
//! [`sink`] → [`commit`].
#![forbid(unsafe_code)]

pub mod app;
pub mod check;
pub mod cli;
pub mod commit;
pub mod config;
pub mod dated;
#[cfg(feature = "demo")]
pub mod demo;
pub mod discovery;
pub mod error;
pub mod handler;
pub mod logging;
pub mod metrics;
pub mod mixpanel;
pub mod park;
pub mod ratelimit;
pub mod replicate;
pub mod schedule;
pub mod schema;
pub mod secrets;
pub mod setaside;
pub mod sink;
pub mod skip;
pub mod slice;
pub mod snapshot;
pub mod spill;
pub mod split;
pub mod state;
pub mod tables;
