//! Progress while running; a summary table, JSON and an SVG plot afterwards.

use std::path::Path;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::{json, Value};

use crate::ledger::Verdict;
use crate::stats::Stats;

/// A progress bar on a terminal; hidden otherwise or when not wanted.
pub fn progress(show: bool, total: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Everything a run reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub urls: Vec<String>,
    pub users: u32,
    pub processes: u32,
    pub connected: u64,
    pub send_secs: f64,
    pub offered: u64,
    pub accepted: u64,
    pub offered_per_sec: f64,
    /// Sustained: first deliveries before the send schedule ended, per second of it.
    pub delivered_per_sec: f64,
    /// First deliveries after the send schedule ended (the backlog drained), and how long
    /// the last of them took.
    pub delivered_after_window: u64,
    pub drain_secs: f64,
    pub sent_latency: Percentiles,
    pub delivery_latency: Percentiles,
    pub connect_latency: Percentiles,
    /// Attachments downloaded whose bytes matched their SHA-256 (`--attachments`).
    pub attachments_verified: u64,
    /// `read` receipts that came to the senders (`--read`), once per message and reader.
    pub read_receipts: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_kib_per_conn: Option<f64>,
    pub timeline: Vec<Value>,
}

impl Report {
    pub fn new(
        scenario: &str,
        urls: Vec<String>,
        users: u32,
        processes: u32,
        stats: &Stats,
        verdict: Verdict,
        send_secs: f64,
    ) -> Self {
        let secs = send_secs.max(0.001);
        let timeline = stats
            .timeline
            .iter()
            .map(|(t, s)| {
                let p = Percentiles::of(&s.latency);
                json!({"t": t, "offered": s.offered, "delivered": s.delivered,
                       "p50_ms": p.p50_ms, "p99_ms": p.p99_ms, "p999_ms": p.p999_ms, "max_ms": p.max_ms})
            })
            .collect();
        Report {
            scenario: scenario.into(),
            urls,
            users,
            processes,
            connected: stats.connected,
            send_secs,
            offered: stats.offered,
            accepted: stats.accepted,
            offered_per_sec: stats.offered as f64 / secs,
            delivered_per_sec: stats.delivered_in_window as f64 / secs,
            delivered_after_window: stats.deliveries.saturating_sub(stats.delivered_in_window),
            drain_secs: stats.drain_ms as f64 / 1000.0,
            sent_latency: Percentiles::of(&stats.sent),
            delivery_latency: Percentiles::of(&stats.delivered),
            connect_latency: Percentiles::of(&stats.connect),
            attachments_verified: stats.attachments_verified,
            read_receipts: stats.read_receipts,
            errors: stats.errors.clone(),
            verdict,
            server_rss_kib_per_conn: None,
            timeline,
        }
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("  {k:<24} {v}\n"));
        out.push_str(&format!(
            "{} — {} users over {} URL(s), {} process(es)\n",
            self.scenario,
            self.users,
            self.urls.len(),
            self.processes
        ));
        line(&mut out, "connected", self.connected.to_string());
        if self.offered > 0 {
            line(
                &mut out,
                "offered",
                format!(
                    "{} msgs in {:.1} s = {:.0} msgs/s",
                    self.offered, self.send_secs, self.offered_per_sec
                ),
            );
            line(&mut out, "accepted (sent)", self.accepted.to_string());
            line(
                &mut out,
                "delivered",
                format!(
                    "{} of {} owed; sustained {:.0} msgs/s",
                    self.verdict.delivered, self.verdict.expected, self.delivered_per_sec
                ),
            );
            line(
                &mut out,
                "after the send window",
                format!(
                    "{} delivered while draining, the last {:.2} s after",
                    self.delivered_after_window, self.drain_secs
                ),
            );
            if self.attachments_verified > 0 {
                line(
                    &mut out,
                    "attachments",
                    format!(
                        "{} downloaded, each matching its SHA-256",
                        self.attachments_verified
                    ),
                );
            }
            if self.read_receipts > 0 {
                line(
                    &mut out,
                    "read receipts",
                    format!("{} came to the senders", self.read_receipts),
                );
            }
        }
        out.push_str(&format!(
            "  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
        ));
        for (name, p) in [
            ("send → sent", &self.sent_latency),
            ("send → delivered", &self.delivery_latency),
            ("connect → welcome", &self.connect_latency),
        ] {
            if p.count > 0 {
                out.push_str(&format!(
                    "  {name:<24} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                    p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
                ));
            }
        }
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            line(&mut out, "errors", errors.join(" "));
        }
        if let Some(kib) = self.server_rss_kib_per_conn {
            line(&mut out, "server RSS per conn", format!("{kib:.2} KiB"));
        }
        let v = &self.verdict;
        if v.expected > 0 || v.duplicated > 0 {
            line(
                &mut out,
                "correctness",
                format!(
                    "lost={} duplicated={} reordered={} unconfirmed={} → {}",
                    v.lost,
                    v.duplicated,
                    v.reordered,
                    v.unconfirmed,
                    if v.clean() { "OK" } else { "FAILED" }
                ),
            );
        }
        out
    }

    /// Throughput (offered, delivered) and delivery-latency percentiles per second.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let points = |key: &str| -> Vec<(f64, f64)> {
            self.timeline
                .iter()
                .filter_map(|s| Some((s["t"].as_f64()?, s[key].as_f64()?)))
                .collect()
        };
        let end = self
            .timeline
            .iter()
            .filter_map(|s| s["t"].as_f64())
            .fold(1.0, f64::max)
            + 1.0;
        let root = SVGBackend::new(path, (1000, 720)).into_drawing_area();
        root.fill(&WHITE)?;
        let (upper, lower) = root.split_vertically(360);
        let throughput = [
            ("offered", points("offered"), BLUE),
            ("delivered", points("delivered"), GREEN),
        ];
        panel(
            &upper,
            &format!("{} — throughput", self.scenario),
            "msgs/s",
            end,
            &throughput,
        )?;
        let latency = [
            ("p50", points("p50_ms"), GREEN),
            ("p99", points("p99_ms"), BLUE),
            ("p999", points("p999_ms"), MAGENTA),
            ("max", points("max_ms"), RED),
        ];
        panel(&lower, "send → delivered latency", "ms", end, &latency)?;
        root.present()?;
        Ok(())
    }
}

/// A named line: its points (seconds, value) and colour.
type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// One chart of the plot: named series against seconds.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    end: f64,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    let top = series
        .iter()
        .flat_map(|(_, p, _)| p.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(unit)
        .draw()?;
    for (name, points, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
