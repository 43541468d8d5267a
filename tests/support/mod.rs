//! Shared helpers of the integration tests: real servers on loopback.
#![allow(dead_code)]

pub mod aws;
pub mod chaos;
pub mod harness;
pub mod moto;
pub mod proxy;
pub mod template;
