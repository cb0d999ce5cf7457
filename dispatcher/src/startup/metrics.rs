//! The process-wide Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, from 100 µs to 10 s.
const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// Buckets for counts of messages, from none to 100,000.
const COUNT_BUCKETS: [f64; 11] = [
    0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10_000.0, 100_000.0,
];

/// Histograms of sizes (counts of things) rather than seconds: bucketed too, so that their
/// quantiles are computed over any window Prometheus asks for (an unbucketed histogram is
/// rendered as a summary whose quantiles read 0 after a quiet spell).
const COUNT_HISTOGRAMS: [&str; 4] = [
    "gateway_replayed_messages",
    "dispatcher_batch_size",
    "storage_group_commit_size",
    "storage_batch_statements",
];

/// The metric catalogue of docs/operations.md: every metric with its type, labels and
/// meaning. The test command checks it against the code (`infra/check-observability.py`),
/// so it is also where the HELP text comes from.
const CATALOGUE: &str = include_str!("../../../docs/operations.md");

/// Gives every metric of the catalogue its HELP text, and makes the counters without labels
/// appear (at 0) before their first event, so a dashboard sees them from the first scrape.
fn describe_catalogue() {
    for line in CATALOGUE.lines() {
        let cells: Vec<&'static str> = line.split('|').map(str::trim).collect();
        let [_, name, kind, labels, help, ..] = cells.as_slice() else {
            continue;
        };
        let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) else {
            continue;
        };
        let help = *help;
        match *kind {
            "counter" => {
                metrics::describe_counter!(name, help);
                if labels.is_empty() {
                    metrics::counter!(name).increment(0);
                }
            }
            "gauge" => metrics::describe_gauge!(name, help),
            "histogram" => metrics::describe_histogram!(name, help),
            _ => {}
        }
    }
}

/// Installs the recorder on first use and returns its handle (several gateways in one
/// process, as in tests, share it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder =
                COUNT_HISTOGRAMS
                    .iter()
                    .try_fold(PrometheusBuilder::new(), |builder, name| {
                        builder
                            .set_buckets_for_metric(Matcher::Full((*name).into()), &COUNT_BUCKETS)
                    });
            let builder = builder.and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("seconds".into()), &BUCKETS)
            });
            let builder = match builder {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
            match builder.install_recorder() {
                Ok(handle) => {
                    describe_catalogue();
                    handle
                }
                // Another recorder is installed: serve an empty one rather than fail.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}
