//! Latency histograms, counters and a per-second timeline.

use std::collections::BTreeMap;

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One second of the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Second {
    pub offered: u64,
    pub delivered: u64,
    #[serde(with = "as_base64")]
    pub latency: Histogram<u64>,
}

/// Everything measured in one run (or merged from several processes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    /// Intended send time → `sent`, µs.
    #[serde(with = "as_base64")]
    pub sent: Histogram<u64>,
    /// Intended send time → the `message` frame at a recipient (first arrival), µs.
    #[serde(with = "as_base64")]
    pub delivered: Histogram<u64>,
    /// TCP connect → `welcome`, µs.
    #[serde(with = "as_base64")]
    pub connect: Histogram<u64>,
    pub offered: u64,
    pub accepted: u64,
    pub deliveries: u64,
    /// Deliveries (first arrivals) before the send schedule ended: what the system kept up
    /// with. The rest arrived while draining.
    #[serde(default)]
    pub delivered_in_window: u64,
    /// Milliseconds from the end of the send schedule to the last delivery (0 if none came
    /// after it).
    #[serde(default)]
    pub drain_ms: u64,
    pub connected: u64,
    /// Attachments downloaded whose bytes hash to what the message said.
    #[serde(default)]
    pub attachments_verified: u64,
    /// `read` receipts that came (`--read`), one per message and reader (one that came
    /// again after a reconnect counts once).
    #[serde(default)]
    pub read_receipts: u64,
    pub errors: BTreeMap<String, u64>,
    /// By second since the start of the send phase.
    pub timeline: BTreeMap<u64, Second>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sent: histogram(),
            delivered: histogram(),
            connect: histogram(),
            offered: 0,
            accepted: 0,
            deliveries: 0,
            delivered_in_window: 0,
            drain_ms: 0,
            connected: 0,
            attachments_verified: 0,
            read_receipts: 0,
            errors: BTreeMap::new(),
            timeline: BTreeMap::new(),
        }
    }
}

impl Stats {
    pub fn error(&mut self, code: impl Into<String>) {
        *self.errors.entry(code.into()).or_default() += 1;
    }

    pub fn second(&mut self, at: u64) -> &mut Second {
        self.timeline.entry(at).or_insert_with(|| Second {
            offered: 0,
            delivered: 0,
            latency: histogram(),
        })
    }

    pub fn merge(&mut self, other: Stats) {
        let _ = self.sent.add(&other.sent);
        let _ = self.delivered.add(&other.delivered);
        let _ = self.connect.add(&other.connect);
        self.offered += other.offered;
        self.accepted += other.accepted;
        self.deliveries += other.deliveries;
        self.delivered_in_window += other.delivered_in_window;
        self.drain_ms = self.drain_ms.max(other.drain_ms);
        self.connected += other.connected;
        self.attachments_verified += other.attachments_verified;
        self.read_receipts += other.read_receipts;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (at, second) in other.timeline {
            let mine = self.second(at);
            mine.offered += second.offered;
            mine.delivered += second.delivered;
            let _ = mine.latency.add(&second.latency);
        }
    }
}

/// Serializes histograms in the HdrHistogram V2 format, base64 encoded, so that processes
/// can merge them exactly.
mod as_base64 {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        h: &Histogram<u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut bytes)
            .map_err(|e| serde::ser::Error::custom(format!("{e:?}")))?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| serde::de::Error::custom(format!("{e:?}")))
    }
}
