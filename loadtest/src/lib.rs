//! The load generator of the chat backend, and a small typed client of its protocol.
//!
//! `loadtest` speaks only the client protocol (`docs/protocol.md`) to any gateway URL, so
//! it measures what clients get: latency from the *intended* send time (no coordinated
//! omission), offered versus delivered throughput, errors by code, and correctness — every
//! accepted message delivered to every recipient, in per-sender order, with duplicates
//! counted. It depends on nothing of the server.

pub mod bench;
pub mod client;
pub mod e2ee;
pub mod hostile;
pub mod ledger;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod stats;
