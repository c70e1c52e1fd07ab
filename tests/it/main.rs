//! Real-binary tests: `provision serve` on port 0 in a temp data dir, driven through its CLI
//! and HTTP, with rendered configs checked by the real validators (cloud-init, Ignition,
//! debconf).

#[path = "../common/pg_cluster.rs"]
mod pg_cluster;
mod support;

mod admin;
mod backup;
mod claims;
mod cli;
pub mod crash;
mod daemon;
mod deb;
mod lab;
mod logs;
pub mod metrics;
mod nodes;
mod powercut;
mod register;
pub mod scaleout;
mod snippets;
mod systemd;
mod tftp;
mod ui;
mod validators;
