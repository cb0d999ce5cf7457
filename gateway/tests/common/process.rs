//! Server processes of this workspace (`gateway`, `dispatcher`), started as separate
//! processes for the tests that kill them or measure them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binaries of this workspace (built by `cargo test --workspace --no-run`).
pub(crate) fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_gateway")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo test --workspace --no-run)",
        path.display()
    );
    path
}

/// A server process, killed when dropped.
pub(crate) struct Process {
    pub child: Child,
    /// The address its ready line names (`client=` for a gateway, `admin=` for a
    /// dispatcher).
    pub addr: String,
}

/// Starts `binary_name` and waits for its ready line.
pub(crate) async fn spawn(
    binary_name: &str,
    env: &[(&'static str, String)],
    args: &[&str],
) -> Process {
    let mut child = Command::new(binary(binary_name))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary_name}: {e}"));
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let key = if binary_name == "gateway" {
        "client="
    } else {
        "admin="
    };
    let ready = format!("{binary_name} ready");
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if line.contains(&ready) {
                let addr = line
                    .split(key)
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next());
                return addr.expect("address in the ready line").to_owned();
            }
        }
        panic!("{binary_name} exited before it was ready");
    })
    .await
    .unwrap_or_else(|_| panic!("{binary_name} ready within 60 s"));
    // Keep draining the log so the child never blocks on a full pipe; FAULTS_LOG_DIR keeps
    // it for a look after a failure.
    let keep = std::env::var_os("FAULTS_LOG_DIR").map(|dir| {
        PathBuf::from(dir).join(format!("{binary_name}-{}.log", child.id().unwrap_or(0)))
    });
    tokio::spawn(async move {
        let mut file = match keep {
            Some(path) => std::fs::File::create(path).ok(),
            None => None,
        };
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(file) = file.as_mut() {
                use std::io::Write;
                let _ = writeln!(file, "{line}");
            }
        }
    });
    Process { child, addr }
}

/// An embedded gateway process on `data_dir` (dev mode off, tokens signed with the tests'
/// secret, rate limits out of the way).
#[allow(
    dead_code,
    reason = "not every test binary that shares this module uses it"
)]
pub(crate) async fn embedded_gateway(data_dir: &std::path::Path) -> Process {
    embedded_gateway_with(data_dir, &[]).await
}

/// [`embedded_gateway`] with more environment variables.
pub(crate) async fn embedded_gateway_with(
    data_dir: &std::path::Path,
    more_env: &[(&'static str, String)],
) -> Process {
    let dir = data_dir.display().to_string();
    let mut env = vec![
        ("GATEWAY_JWT_SECRET", super::SECRET.to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    env.extend_from_slice(more_env);
    spawn(
        "gateway",
        &env,
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--dev",
            "false",
            "--rate-per-sec",
            "1000000",
            "--rate-burst",
            "1000000",
            "--data-dir",
            &dir,
        ],
    )
    .await
}

impl Process {
    pub(crate) async fn sigkill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM (a graceful drain), then waits for the process to exit.
    pub(crate) async fn sigterm(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -TERM {}", self.pid());
        let _ = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exited within 60 s of SIGTERM");
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}
