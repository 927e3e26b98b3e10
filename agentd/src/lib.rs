//! agentd: the kernel, not the agent, decides what an AI agent may do.
//!
//! The crate is the `agentd` program; the library exists so that the fuzz targets
//! (fuzz/) reach the parsers through [`fuzzing`]. Everything else is private to it.

mod ask;
mod audit;
mod bpf;
mod breaker;
pub mod cli;
mod daemon;
mod dns;
mod doctor;
mod event;
mod export;
pub mod fuzzing;
#[doc(hidden)]
pub mod harness;
mod host;
mod link;
mod profile;
mod report;
mod run;
mod sandbox;
mod syscalls;
mod transaction;
