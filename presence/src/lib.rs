//! Who is online, where, and how to reach them.
//!
//! `presence` owns online/offline status with a TTL, the locations of each user's
//! connected devices (node and connection), the per-node delivery channels that
//! dispatchers publish to, and presence-change notifications. It stores nothing durable:
//! losing all of it makes users look offline until their next heartbeat and sends new
//! messages down the pending-queue path, which is always safe. It knows nothing of
//! WebSockets or of the inbound log.

pub mod error;
pub mod presence;

pub use error::{Error, Result};
pub use presence::{
    ConnRef, Location, MemoryPresence, NodeDelivery, Payload, Presence, PresenceService, Quota,
    RedisConfig, RedisPresence, Status,
};
