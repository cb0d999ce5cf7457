//! What the storage suites share; the presence and dispatcher suites include this file by
//! path (`#[path]`), so that a test server is found the same way everywhere.

/// A test server's address from the environment: `None` (the suite is skipped) when it is
/// not set, except under CI, where a missing server fails the run.
pub(crate) fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: this suite needs its server (run ./infra/test.sh)")
        }
        _ => {
            eprintln!("skipped: {var} is not set (./infra/test.sh starts the servers)");
            None
        }
    }
}
