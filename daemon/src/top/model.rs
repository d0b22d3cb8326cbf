//! What `top` shows, computed from two consecutive samples of the controller: per flow and
//! per device, bytes and rates (the difference between samples over the time between them).

use std::{collections::HashMap, time::Instant};

use serde_json::Value;

/// The flows' order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Rate,
    Total,
    Newest,
}

impl Sort {
    pub fn next(self) -> Sort {
        match self {
            Sort::Rate => Sort::Total,
            Sort::Total => Sort::Newest,
            Sort::Newest => Sort::Rate,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Sort::Rate => "rate",
            Sort::Total => "total",
            Sort::Newest => "newest",
        }
    }
}

/// (upload, download).
pub type Pair<T> = (T, T);

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    /// Hostname, else MAC, else address.
    pub name: String,
    pub ips: String,
    /// Live flows from it.
    pub flows: usize,
    pub rate: Pair<f64>,
    /// None without history.
    pub today: Option<u64>,
    pub month: Option<u64>,
    /// All time (without history: its live flows).
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlowRow {
    pub target: String,
    pub source: String,
    pub network: String,
    pub rule: String,
    pub chain: String,
    pub bytes: Pair<u64>,
    pub rate: Pair<f64>,
    pub start: String,
}

#[derive(Debug)]
pub struct Model {
    pub controller: String,
    pub error: Option<String>,
    pub sort: Sort,
    /// Since the daemon started, and per second now.
    pub totals: Pair<u64>,
    pub rates: Pair<f64>,
    pub history: bool,
    pub devices: Vec<DeviceRow>,
    pub flows: Vec<FlowRow>,
    at: Option<Instant>,
    seen_flows: HashMap<String, Pair<u64>>,
    seen_devices: HashMap<String, Pair<u64>>,
}

fn pair(v: &Value) -> Pair<u64> {
    (
        v["upload"].as_u64().unwrap_or(0),
        v["download"].as_u64().unwrap_or(0),
    )
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

impl Model {
    pub fn new(controller: &str) -> Model {
        Model {
            controller: controller.to_owned(),
            error: None,
            sort: Sort::Rate,
            totals: (0, 0),
            rates: (0.0, 0.0),
            history: false,
            devices: Vec::new(),
            flows: Vec::new(),
            at: None,
            seen_flows: HashMap::new(),
            seen_devices: HashMap::new(),
        }
    }

    /// Takes a sample: `/connections`, and `/api/v1/devices`' data when the history is on.
    pub fn update(&mut self, connections: &Value, devices: Option<&Value>, now: Instant) {
        self.error = None;
        let secs = self
            .at
            .map(|t| now.duration_since(t).as_secs_f64())
            .filter(|s| *s > 0.0);
        self.at = Some(now);
        let rate = |was: Option<&Pair<u64>>, is: Pair<u64>| match (was, secs) {
            (Some(w), Some(s)) => (
                is.0.saturating_sub(w.0) as f64 / s,
                is.1.saturating_sub(w.1) as f64 / s,
            ),
            _ => (0.0, 0.0),
        };
        let totals = (
            connections["uploadTotal"].as_u64().unwrap_or(0),
            connections["downloadTotal"].as_u64().unwrap_or(0),
        );
        self.rates = if self.seen_flows.is_empty() && self.totals == (0, 0) {
            (0.0, 0.0)
        } else {
            rate(Some(&self.totals), totals)
        };
        self.totals = totals;

        let live = connections["connections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut seen = HashMap::new();
        self.flows = live
            .iter()
            .map(|c| {
                let m = &c["metadata"];
                let bytes = pair(c);
                let id = text(&c["id"]).to_owned();
                let row = FlowRow {
                    target: format!(
                        "{}:{}",
                        [&m["host"], &m["sniffHost"], &m["destinationIP"]]
                            .into_iter()
                            .map(text)
                            .find(|s| !s.is_empty())
                            .unwrap_or("?"),
                        text(&m["destinationPort"])
                    ),
                    source: text(&m["sourceIP"]).to_owned(),
                    network: text(&m["network"]).to_owned(),
                    rule: match text(&c["rulePayload"]) {
                        "" => text(&c["rule"]).to_owned(),
                        p => format!("{}({p})", text(&c["rule"])),
                    },
                    chain: c["chains"]
                        .as_array()
                        .map(|ch| ch.iter().rev().map(text).collect::<Vec<_>>().join(" → "))
                        .unwrap_or_default(),
                    bytes,
                    rate: rate(self.seen_flows.get(&id), bytes),
                    start: text(&c["start"]).to_owned(),
                };
                seen.insert(id, bytes);
                row
            })
            .collect();
        self.seen_flows = seen;
        self.sort_flows();

        self.history = devices.is_some();
        let mut seen = HashMap::new();
        self.devices = match devices.and_then(Value::as_array) {
            Some(list) => {
                // An address seen from several devices (a MAC that changed) is the one that
                // used it last: its live flows count there.
                let mut owner: HashMap<&str, (&str, &str)> = HashMap::new();
                for d in list {
                    let last = text(&d["last_seen"]);
                    for ip in d["ips"].as_array().into_iter().flatten().map(text) {
                        let o = owner.entry(ip).or_insert((text(&d["device"]), last));
                        if last > o.1 {
                            *o = (text(&d["device"]), last);
                        }
                    }
                }
                list.iter()
                    .map(|d| {
                        let id = text(&d["device"]).to_owned();
                        let ips: Vec<&str> = d["ips"]
                            .as_array()
                            .map(|a| a.iter().map(text).collect())
                            .unwrap_or_default();
                        let bytes = pair(d);
                        let row = DeviceRow {
                            name: d["hostname"].as_str().unwrap_or(&id).to_owned(),
                            flows: self
                                .flows
                                .iter()
                                .filter(|f| {
                                    owner.get(f.source.as_str()).map(|o| o.0) == Some(id.as_str())
                                })
                                .count(),
                            ips: ips.join(", "),
                            rate: rate(self.seen_devices.get(&id), bytes),
                            today: d["today"].as_u64(),
                            month: d["month"].as_u64(),
                            total: d["total"].as_u64().unwrap_or(bytes.0 + bytes.1),
                        };
                        seen.insert(id, bytes);
                        row
                    })
                    .collect()
            }
            None => {
                let mut by_source: HashMap<&str, DeviceRow> = HashMap::new();
                for f in &self.flows {
                    let d = by_source.entry(&f.source).or_insert_with(|| DeviceRow {
                        name: f.source.clone(),
                        ips: f.source.clone(),
                        flows: 0,
                        rate: (0.0, 0.0),
                        today: None,
                        month: None,
                        total: 0,
                    });
                    d.flows += 1;
                    d.rate = (d.rate.0 + f.rate.0, d.rate.1 + f.rate.1);
                    d.total += f.bytes.0 + f.bytes.1;
                }
                by_source.into_values().collect()
            }
        };
        self.seen_devices = seen;
        self.devices.sort_by(|a, b| {
            let speed = |d: &DeviceRow| d.rate.0 + d.rate.1;
            speed(b)
                .total_cmp(&speed(a))
                .then(b.total.cmp(&a.total))
                .then(a.name.cmp(&b.name))
        });
    }

    fn sort_flows(&mut self) {
        let sort = self.sort;
        self.flows.sort_by(|a, b| match sort {
            Sort::Rate => (b.rate.0 + b.rate.1).total_cmp(&(a.rate.0 + a.rate.1)),
            Sort::Total => (b.bytes.0 + b.bytes.1).cmp(&(a.bytes.0 + a.bytes.1)),
            Sort::Newest => b.start.cmp(&a.start),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn flow(id: &str, src: &str, up: u64, down: u64) -> Value {
        json!({"id": id, "upload": up, "download": down, "rule": "MATCH", "rulePayload": "",
               "chains": ["DIRECT"], "start": "2026-11-23T00:00:00Z",
               "metadata": {"host": "a.example", "destinationPort": "443", "sourceIP": src,
                            "network": "tcp"}})
    }

    #[test]
    fn rates_are_differences_over_the_time_between_samples() {
        let mut m = Model::new("x");
        let t = Instant::now();
        let conns = |a: u64, b: u64| {
            json!({"uploadTotal": a, "downloadTotal": b,
                   "connections": [flow("1", "10.0.0.2", a, b)]})
        };
        // The address was an older device's before (its MAC changed): flows count once.
        let devices = |a: u64, b: u64| {
            json!([{"device": "02:00:00:00:00:01", "ips": ["10.0.0.2"], "hostname": "laptop",
                    "last_seen": "2026-11-23T10:00:00.000Z",
                    "upload": a, "download": b, "today": a + b, "month": a + b, "total": a + b},
                   {"device": "02:00:00:00:00:09", "ips": ["10.0.0.2"],
                    "last_seen": "2026-11-22T10:00:00.000Z",
                    "upload": 1, "download": 1, "today": 0, "month": 2, "total": 2}])
        };
        m.update(&conns(100, 1_000), Some(&devices(100, 1_000)), t);
        assert_eq!(m.flows[0].rate, (0.0, 0.0));
        m.update(
            &conns(300, 5_000),
            Some(&devices(300, 5_000)),
            t + Duration::from_secs(2),
        );
        assert_eq!(m.rates, (100.0, 2_000.0));
        assert_eq!(m.flows[0].rate, (100.0, 2_000.0));
        assert_eq!(m.flows[0].target, "a.example:443");
        assert_eq!(m.devices[0].name, "laptop");
        assert_eq!(m.devices[0].rate, (100.0, 2_000.0));
        assert_eq!(m.devices[0].flows, 1);
        assert_eq!(m.devices[0].today, Some(5_300));
        assert_eq!(m.devices[1].flows, 0);
        // Without history, devices are the live flows' sources.
        m.update(&conns(300, 5_000), None, t + Duration::from_secs(3));
        assert_eq!(m.devices[0].name, "10.0.0.2");
        assert_eq!(m.devices[0].today, None);
        assert_eq!(m.devices[0].total, 5_300);
    }
}
