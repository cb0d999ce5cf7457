//! The one error type of the dispatcher crate.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log cannot take or deliver records now (no consumer, queue closed, broker down).
    #[error("inbound log unavailable: {0}")]
    Unavailable(String),
    /// The consumer processed the record and refused or failed it.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Store(#[from] storage::Error),
    #[error(transparent)]
    Presence(#[from] presence::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
