//! The WebSocket gateway.
//!
//! `gateway` owns what faces clients: WebSocket serving with tokio-tungstenite, JWT
//! authentication at the handshake, the client protocol, rate limits, bounded
//! per-connection queues, heartbeats, the drain on shutdown, and the operator endpoints.
//! With no backend configured its binary runs the whole system in one process (the
//! embedded default). It does not persist or route messages itself: it publishes to the
//! inbound log and receives deliveries for its node from the dispatchers.

pub mod admin;
pub mod app;
pub mod auth;
pub mod config;
pub mod connection;
pub mod e2ee;
pub mod fragments;
pub mod hub;
pub mod jwks;
pub mod keys;
pub mod limits;
mod listener;
pub mod media;
pub mod metrics;
pub mod protocol;
pub mod receipts;
mod routes;
pub mod server;
pub mod session;
pub mod tls;

pub use config::Config;
pub use server::{start, Running};

use std::net::SocketAddr;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] storage::Error),
    #[error(transparent)]
    Presence(#[from] presence::Error),
    #[error(transparent)]
    Dispatcher(#[from] dispatcher::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}
