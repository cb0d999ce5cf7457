use anyhow::Context;
use clap::Parser;
use gateway::Config;

/// jemalloc: under load glibc malloc cost a quarter of the CPU (consolidation, and arena
/// locks between threads); idle connections cost the same with both.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    dispatcher::logging::init(config.log_format);

    let running = gateway::start(config)
        .await
        .context("starting the gateway")?;
    shutdown_signal().await;
    tracing::info!("shutdown requested, draining");
    running.shutdown();
    running.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
