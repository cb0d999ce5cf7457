//! The at-rest key ring's flags, the same in both binaries (every process of a cluster
//! reads the same ring).

use std::path::PathBuf;
use std::time::Duration;

use storage::crypto::KeySource;

/// Where the at-rest key ring comes from, and how often its file is checked for a change.
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// Key ring file for at-rest encryption: lines of `<id>:<64 hex chars>` and optionally
    /// `primary=<id>` (else the last key is primary). Read again on SIGHUP and when it
    /// changes; `gateway keys --help` rotates it.
    #[arg(long, env = "STORAGE_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,

    /// Seconds between checks of the key file for a change (0: reload on SIGHUP only).
    #[arg(long, env = "STORAGE_KEYS_RELOAD_SECS", default_value_t = 10)]
    pub keys_reload_secs: u64,

    /// The key ring inline (comma or newline separated), instead of a file.
    #[arg(
        long,
        env = "STORAGE_KEYS",
        hide_env_values = true,
        conflicts_with = "keys_file"
    )]
    pub keys: Option<String>,
}

impl KeyArgs {
    /// The ring the flags name, or `None` when neither `--keys-file` nor `--keys` is set
    /// (a cluster refuses to start then; the embedded mode generates a development key).
    pub fn source(&self) -> Option<KeySource> {
        match (&self.keys_file, &self.keys) {
            (Some(path), _) => Some(KeySource::File(path.clone())),
            (None, Some(inline)) => Some(KeySource::Inline(inline.clone())),
            (None, None) => None,
        }
    }

    /// The ring the flags name, required: a cluster's processes must all read the same
    /// one, so none may make up its own.
    pub fn required(&self) -> Result<KeySource, String> {
        self.source().ok_or_else(|| {
            "distributed mode needs the at-rest key ring shared by every process: \
             set STORAGE_KEYS or STORAGE_KEYS_FILE"
                .to_owned()
        })
    }

    /// How often the key file is checked for a change (zero: on SIGHUP only).
    pub fn reload_every(&self) -> Duration {
        Duration::from_secs(self.keys_reload_secs)
    }
}
