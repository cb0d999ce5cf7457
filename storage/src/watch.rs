//! Reading files again without a restart: on SIGHUP, and when any of them changes (its
//! modification time, checked every `poll`). The TLS certificate and the at-rest key ring
//! are both reloaded this way.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// Calls `reload(why)` on SIGHUP and whenever one of `files` changes (checked every `poll`;
/// zero: on SIGHUP only), until `stop`. `reload` does its own logging and counting.
pub fn on_change(
    files: Vec<PathBuf>,
    poll: Duration,
    stop: CancellationToken,
    reload: impl Fn(&'static str) + Send + 'static,
) -> std::io::Result<()> {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stamps = move || -> Vec<Option<SystemTime>> {
        files
            .iter()
            .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
            .collect()
    };
    tokio::spawn(async move {
        let mut seen = stamps();
        let mut tick = tokio::time::interval(if poll.is_zero() {
            Duration::from_secs(3600)
        } else {
            poll
        });
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hangup = hangup.recv();
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                _ = hangup => "SIGHUP",
                _ = tick.tick() => {
                    if poll.is_zero() || stamps() == seen {
                        continue;
                    }
                    "the files changed"
                }
            };
            seen = stamps();
            reload(why);
        }
    });
    Ok(())
}
