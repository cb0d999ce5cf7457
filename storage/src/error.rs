//! The one error type of the storage crate.

use uuid::Uuid;

/// Everything a store operation can fail with. `Backend` and `Unavailable` are failures of
/// the machinery (retry later); the others describe the request or the data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A user's media uploads of the day would pass their quota.
    #[error("daily upload quota: {0}")]
    Quota(String),
    #[error("message {0} is encrypted with key id {1}, which is not in the key ring: add that key to the key file")]
    UnknownKey(Uuid, u32),
    #[error("message {0} failed to decrypt: its ciphertext, nonce or associated data was altered")]
    Decrypt(Uuid),
    #[error("encryption keys: {0}")]
    Keys(String),
    #[error("storage backend failed: {0}")]
    Backend(String),
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// True for failures of the backend itself, as opposed to answers about the request.
    /// In the embedded store such a failure aborts the whole group commit it was part of.
    pub fn is_backend(&self) -> bool {
        matches!(
            self,
            Error::Backend(_) | Error::Unavailable(_) | Error::Io { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
