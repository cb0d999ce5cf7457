//! Private test servers (Redis, Kafka) that a fault test may kill and restart.

/// A private test server (Redis or Kafka) that a fault test may kill and restart, run by
/// `infra/servers.sh run` on a free loopback port.
pub(crate) struct Server {
    kind: &'static str,
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<tokio::process::Child>,
}

fn servers_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/servers.sh")
}

impl Server {
    /// Starts a server and waits until it answers a real request.
    pub(crate) async fn start(kind: &'static str) -> Server {
        let [port] = super::free_ports();
        let mut server = Server {
            kind,
            dir: tempfile::tempdir().expect("tempdir"),
            port,
            child: None,
        };
        server.restart().await;
        server
    }

    /// Starts the server (again) on the same port and data dir.
    pub(crate) async fn restart(&mut self) {
        let child = tokio::process::Command::new(servers_script())
            .args(["run", self.kind])
            .arg(self.dir.path().join("server"))
            .arg(self.port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn infra/servers.sh run");
        self.child = Some(child);
        let waited = tokio::process::Command::new(servers_script())
            .args(["wait", self.kind, &self.port.to_string(), "120"])
            .status()
            .await
            .expect("infra/servers.sh wait");
        assert!(
            waited.success(),
            "{} did not come up on {}",
            self.kind,
            self.port
        );
    }

    /// SIGKILLs the server and waits for it to be gone.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    pub(crate) fn address(&self) -> String {
        match self.kind {
            "redis" => format!("redis://127.0.0.1:{}", self.port),
            "s3" => format!("http://127.0.0.1:{}", self.port),
            _ => format!("127.0.0.1:{}", self.port),
        }
    }
}
