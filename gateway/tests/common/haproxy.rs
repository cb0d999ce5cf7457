//! HAProxy in front of a test's gateways, as clients reach them in production.

use std::time::{Duration, Instant};

use super::free_ports;

/// HAProxy as `infra/haproxy.cfg` configures it (least connections, `/readyz` health
/// checks every 2 s), in front of gateways at `(client port, admin port)`, with a stats
/// listener to see which servers it counts as up and its runtime API on a socket.
///
/// `pinned`: the suites' set-up, where a test decides which gateway each connection
/// reaches (its sender and recipient on different nodes): a request whose query has
/// `gw=<n>` goes to `gateway-<n>`, and there are no health checks (a test that breaks a
/// backend still reaches the gateway it chose, as a client that stays connected would).
pub(crate) struct Haproxy {
    child: tokio::process::Child,
    pub(crate) port: u16,
    stats: u16,
    dir: tempfile::TempDir,
}

impl Haproxy {
    pub(crate) async fn start(gateways: &[(u16, u16)], pinned: bool) -> Haproxy {
        // A port chosen here may be taken by another test before HAProxy binds it; HAProxy
        // then exits (`noreuseport`: it never shares a port) and is started again on others.
        for _ in 0..5 {
            if let Some(haproxy) = Haproxy::try_start(gateways, pinned).await {
                if !pinned {
                    for i in 1..=gateways.len() {
                        haproxy.wait_until(&format!("gateway-{i}"), true).await;
                    }
                }
                return haproxy;
            }
        }
        panic!("HAProxy could not bind its ports in five tries");
    }

    /// Starts HAProxy on fresh ports; `None` if it exited (a port was taken) before its
    /// runtime API answered, which it does once every listener is bound.
    async fn try_start(gateways: &[(u16, u16)], pinned: bool) -> Option<Haproxy> {
        let shipped = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra/haproxy.cfg"),
        )
        .expect("infra/haproxy.cfg");
        let [port, stats] = free_ports();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = String::new();
        for line in shipped.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("server ")
                || (pinned
                    && ["option httpchk", "http-check", "default-server"]
                        .iter()
                        .any(|p| trimmed.starts_with(p)))
            {
                continue;
            }
            config.push_str(&match trimmed {
                // The file descriptors a test process may have, not production's; the
                // runtime API an operator drains a server with; and no port shared with
                // another test's HAProxy (by default it binds with SO_REUSEPORT, and two
                // instances on one port would split its connections between them).
                l if l.starts_with("maxconn") => format!(
                    "    maxconn 4000\n    noreuseport\n    stats socket {}/admin.sock level admin",
                    dir.path().display()
                ),
                l if l.starts_with("bind ") => format!("    bind 127.0.0.1:{port}"),
                _ => line.to_owned(),
            });
            config.push('\n');
        }
        for (i, (client, admin)) in gateways.iter().enumerate() {
            let n = i + 1;
            if pinned {
                config.push_str(&format!(
                    "    use-server gateway-{n} if {{ url_param(gw) -m str {n} }}\n"
                ));
            }
            config.push_str(&format!(
                "    server gateway-{n} 127.0.0.1:{client} port {admin}\n"
            ));
        }
        config.push_str(&format!(
            "\nlisten stats\n    bind 127.0.0.1:{stats}\n    stats enable\n    stats uri /\n"
        ));
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let child = tokio::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is installed (infra/validate.sh installs it)");
        let mut haproxy = Haproxy {
            child,
            port,
            stats,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = haproxy.child.try_wait() {
                return None;
            }
            if haproxy.answers().await {
                return Some(haproxy);
            }
            assert!(Instant::now() < deadline, "HAProxy did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the runtime API answers (HAProxy has bound every listener).
    async fn answers(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut socket) =
            tokio::net::UnixStream::connect(self.dir.path().join("admin.sock")).await
        else {
            return false;
        };
        let mut answer = String::new();
        socket.write_all(b"show info\n").await.is_ok()
            && socket.read_to_string(&mut answer).await.is_ok()
            && answer.contains("Pid:")
    }

    /// Sends one command to HAProxy's runtime API and returns its answer.
    pub(crate) async fn command(&self, command: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::UnixStream::connect(self.dir.path().join("admin.sock"))
            .await
            .expect("HAProxy's runtime API");
        socket
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("send a command");
        let mut answer = String::new();
        socket
            .read_to_string(&mut answer)
            .await
            .expect("read the answer");
        answer
    }

    /// Waits until HAProxy's health checks count `server` as up (or, `up` false, as down).
    pub(crate) async fn wait_until(&self, server: &str, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let csv = reqwest::get(format!("http://127.0.0.1:{}/;csv", self.stats))
                .await
                .ok();
            let csv = match csv {
                Some(response) => response.text().await.unwrap_or_default(),
                None => String::new(),
            };
            let is_up = csv.lines().any(|l| {
                let fields: Vec<&str> = l.split(',').collect();
                fields.get(1) == Some(&server) && fields.get(17) == Some(&"UP")
            });
            if is_up == up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{server} is not {} in HAProxy",
                if up { "up" } else { "down" }
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
