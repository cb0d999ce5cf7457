//! The inbound log and the dispatch loop.
//!
//! `dispatcher` owns the [`Envelope`]s that gateways publish, the inbound log they travel
//! through ([`InboundLog`], with an in-process partitioned implementation and the Kafka
//! one), and [`Dispatcher`]: consume each partition in order, persist, route to the nodes
//! holding the recipients (or leave the message pending and emit a push-notification
//! event), answer the sending connection, and only then commit. It knows nothing of
//! WebSockets or of the client protocol.
//!
//! It is also where both binaries' start-up lives ([`startup`]: backend flags, the
//! [`startup::Backends`] they give, logging, metrics, readiness, signals), since the
//! gateway already depends on it.

pub mod dispatch;
pub mod envelope;
pub mod error;
pub mod log;
pub mod startup;

pub use dispatch::Dispatcher;
pub use envelope::{Envelope, PushEvent};
pub use error::{Error, Result};
pub use log::{Failed, InboundLog, KafkaConfig, KafkaLog, Log, MemoryLog, Partition, Record};
