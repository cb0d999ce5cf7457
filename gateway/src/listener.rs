//! The listening ports: a socket bound with a deep accept queue, and the accept loop that
//! hands each connection (after its TLS handshake, when on) to hyper within a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::tls::Tls;

/// Binds a listening socket with room for `backlog` connections waiting to be accepted
/// (the kernel caps it at `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128:
/// a reconnect storm overflows that, and each SYN dropped costs its client a one-second
/// retransmission (measured with `loadtest hostile`).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A listening port, with TLS or without.
pub(crate) struct Listener {
    tcp: TcpListener,
    tls: Option<Tls>,
}

impl Listener {
    pub(crate) fn new(tcp: TcpListener, tls: Option<Tls>) -> Listener {
        Listener { tcp, tls }
    }

    /// Accepts connections until `stop` and hands each to `spawn` as one future: the TLS
    /// handshake (when on) and HTTP, both within `timeout`, then whatever the router does.
    pub(crate) async fn serve(
        self,
        router: Router,
        timeout: Duration,
        stop: CancellationToken,
        spawn: impl Fn(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>),
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = self.tcp.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (router, stop) = (router.clone(), stop.clone());
            match &self.tls {
                None => spawn(Box::pin(serve_http(stream, router, timeout, stop))),
                Some(tls) => {
                    let acceptor = tls.acceptor().clone();
                    spawn(Box::pin(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => serve_http(stream, router, timeout, stop).await,
                            Ok(Err(e)) => {
                                metrics::counter!("gateway_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!(error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                metrics::counter!("gateway_tls_handshake_failures_total")
                                    .increment(1);
                                tracing::debug!("TLS handshake timed out");
                            }
                        }
                    }))
                }
            }
        }
    }
}

async fn serve_http<S>(stream: S, router: Router, timeout: Duration, shutdown: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => if let Err(e) = served {
            tracing::debug!(error = %e, "http connection ended");
        },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
