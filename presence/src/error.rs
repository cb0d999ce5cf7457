//! The one error type of the presence crate.

/// A presence backend failure. Callers treat presence as best effort where they can
/// (a message whose recipient cannot be located stays pending and is pushed on reconnect).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
    #[error("presence backend failed: {0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
