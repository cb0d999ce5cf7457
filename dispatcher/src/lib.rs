//! The inbound log and the dispatch loop.
//!
//! `dispatcher` owns the [`Envelope`]s that gateways publish, the inbound log they travel
//! through ([`InboundLog`], with an in-process partitioned implementation and the Kafka
//! one), and [`Dispatcher`]: consume each partition in order, persist, route to the nodes
//! holding the recipients (or leave the message pending and emit a push-notification
//! event), answer the sending connection, and only then commit. It knows nothing of
//! WebSockets or of the client protocol.

pub mod backends;
pub mod bus;
pub mod dispatch;
pub mod envelope;
pub mod error;
pub mod logging;
pub mod metrics;

pub use bus::{Bus, Failed, InboundLog, KafkaConfig, KafkaLog, MemoryLog, Partition, Record};
pub use dispatch::Dispatcher;
pub use envelope::{Envelope, PushEvent};
pub use error::{Error, Result};
