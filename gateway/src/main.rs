use anyhow::Context;
use clap::Parser;
use gateway::keys::KeysCommand;
use gateway::Config;

/// With no backend configured the gateway runs the whole system in one process: the
/// dispatcher on an in-process partitioned log, the embedded store in `--data-dir`, and
/// in-memory presence; dev mode is then on unless `--dev false`. With `--kafka-brokers`,
/// `--scylla-nodes` and `--redis-url` it is one gateway of a distributed cluster (run
/// `dispatcher` processes beside it); dev mode is then off unless `--dev true`.
/// `gateway keys` rotates the at-rest key ring.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "WebSocket chat gateway (embedded mode when no backend is configured)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    config: Config,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Rotate the at-rest key ring (add, promote, re-encrypt, retire).
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// jemalloc: under load glibc malloc cost a quarter of the CPU (consolidation, and arena
/// locks between threads); idle connections cost the same with both.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Keys(command)) = cli.command {
        return gateway::keys::run(command).await;
    }
    let config = cli.config;
    dispatcher::startup::logging::init(config.log_format);

    let running = gateway::start(config)
        .await
        .context("starting the gateway")?;
    dispatcher::startup::shutdown_signal().await;
    tracing::info!("shutdown requested, draining");
    running.shutdown();
    running.wait().await;
    Ok(())
}
