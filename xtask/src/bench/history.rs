//! The history figures: month-long queries over a generated home's flows (`cargo bench -p
//! tpacct --bench history`), the store keeping up while the relay churns, and what storing
//! costs the churn (tpacctd with and without `storage`, in the same rounds).

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{Samples, contenders::Contender, median_min_max};

/// The query bench's figures: the insert rate when it generated the data, then per query
/// (name, p50 ms, p95 ms, max ms, rows answered).
#[derive(Debug, Default)]
pub(super) struct Queries {
    flows: u64,
    insert: Option<f64>,
    rows: Vec<(String, f64, f64, f64, u64)>,
}

pub(super) fn run(quick: bool, out_dir: &Path) -> Result<Queries> {
    let dir = std::path::absolute(out_dir)?;
    let out = super::cargo_bench("history", quick, &[("TPACCT_BENCH_DIR", dir.as_os_str())])?;
    let mut q = Queries {
        flows: if quick { 1_000_000 } else { 10_000_000 },
        ..Queries::default()
    };
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["insert", rate] => q.insert = rate.parse().ok(),
            [name, p50, p95, max, rows] => q.rows.push((
                (*name).to_owned(),
                p50.parse()?,
                p95.parse()?,
                max.parse()?,
                rows.parse()?,
            )),
            _ => {}
        }
    }
    if q.rows.is_empty() {
        bail!("history bench printed no figures");
    }
    Ok(q)
}

fn median(samples: &Samples, metric: &'static str, who: Contender) -> Option<(f64, f64, f64)> {
    samples
        .0
        .get(&(metric, who))
        .filter(|v| !v.is_empty())
        .map(|v| median_min_max(v))
}

pub(super) fn markdown(q: &Queries, samples: &Samples) -> String {
    let mut md = format!(
        "\n### History\n\nA month of a 50-device home, {} flows, written through the store's own \
         transactions and rollups{}; each query over the whole month (odd-millisecond edges) \
         through the code `/api/v1/stats` runs, with 1,000 unsaved flows in its snapshot.\n\n\
         | query | p50 | p95 | max | rows |\n|---|---|---|---|---|\n",
        q.flows,
        q.insert.map_or_else(
            || " (reused from an earlier run)".to_owned(),
            |r| format!(" at {r:.0} flows/s")
        ),
    );
    for (name, p50, p95, max, rows) in &q.rows {
        md.push_str(&format!(
            "| {name} | {p50:.1} ms | {p95:.1} ms | {max:.1} ms | {rows} |\n"
        ));
    }
    md.push_str(&churn_cost(samples));
    md
}

/// The churn of each of `who`, then what storing cost it.
pub(super) fn churn_markdown(samples: &Samples, who: &[Contender]) -> String {
    let mut md = String::from("| contender | churn, conn/s (median, min–max) |\n|---|---|\n");
    for &c in who {
        if let Some((m, lo, hi)) = median(samples, "churn", c) {
            md.push_str(&format!("| {} | {m:.0} ({lo:.0}–{hi:.0}) |\n", c.label()));
        }
    }
    md.push_str(&churn_cost(samples));
    md
}

fn churn_cost(samples: &Samples) -> String {
    let mut md = String::new();
    let on = median(samples, "churn", Contender::TpacctEbpf);
    let off = median(samples, "churn", Contender::TpacctNoHistory);
    if let (Some(on), Some(off)) = (on, off) {
        md.push_str(&format!(
            "\nConnection churn with history on: {:.0} conn/s ({:.0}–{:.0}); off: {:.0} conn/s \
             ({:.0}–{:.0}); on/off = {:.3} (medians).\n",
            on.0,
            on.1,
            on.2,
            off.0,
            off.1,
            off.2,
            on.0 / off.0
        ));
    }
    if let (Some(rate), Some(left)) = (
        median(samples, "store_rate", Contender::TpacctEbpf),
        median(samples, "store_left", Contender::TpacctEbpf),
    ) {
        md.push_str(&format!(
            "Store during churn: {:.0} closed flows/s committed ({:.0}–{:.0}); flows still \
             pending when the churn ended: {:.0} (max {:.0}), dropped: none unless said.\n",
            rate.0, rate.1, rate.2, left.0, left.2
        ));
    }
    if let Some(cpu) = median(samples, "store_cpu", Contender::TpacctEbpf) {
        md.push_str(&format!(
            "The store's writer thread used {:.1}% of a core meanwhile ({:.1}–{:.1}%).\n",
            cpu.0 * 100.0,
            cpu.1 * 100.0,
            cpu.2 * 100.0
        ));
    }
    if let Some(dropped) = median(samples, "store_dropped", Contender::TpacctEbpf)
        && dropped.2 > 0.0
    {
        md.push_str(&format!(
            "**The store dropped flows**: up to {:.0} in a round.\n",
            dropped.2
        ));
    }
    md
}

pub(super) fn json(q: &Queries) -> String {
    let items: Vec<String> = q
        .rows
        .iter()
        .map(|(name, p50, p95, max, rows)| {
            format!(
                "    {{\"query\": \"{name}\", \"p50_ms\": {p50}, \"p95_ms\": {p95}, \"max_ms\": {max}, \"rows\": {rows}}}"
            )
        })
        .collect();
    format!(
        "  \"history\": {{\"flows\": {}, \"insert_per_s\": {}, \"queries\": [\n{}\n  ]}},\n",
        q.flows,
        q.insert
            .map_or_else(|| "null".to_owned(), |r| r.to_string()),
        items.join(",\n")
    )
}

/// The store's counters from the gateway's `/metrics`: (written, pending, dropped).
/// tpacctd's `/metrics` text.
fn metrics(topo: &crate::netns::Topology) -> Result<String> {
    let out = crate::netns::Topology::exec(&topo.gateway, Path::new("curl"))
        .args([
            "-sf",
            "-H",
            "Authorization: Bearer bench",
            "http://127.0.0.1:9090/metrics",
        ])
        .output()
        .context("curl /metrics")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Payload bytes tpacctd counted (closed and live flows, upload and download), once no flow
/// is live (so none is mid-way): waits up to 10 s for the last ones to close.
pub(super) fn counted_bytes(topo: &crate::netns::Topology) -> Result<(f64, f64)> {
    let sum = |text: &str, prefix: &str, with: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(with))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = metrics(topo)?;
        if sum(&text, "tpacct_flows_active", "") == 0.0 {
            return Ok((
                sum(&text, "tpacct_bytes_total{", "direction=\"upload\""),
                sum(&text, "tpacct_bytes_total{", "direction=\"download\""),
            ));
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("flows were still live 10 s after the workload");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub(super) fn store_counts(topo: &crate::netns::Topology) -> Result<(f64, f64, f64)> {
    let text = metrics(topo)?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("{name} missing from /metrics"))
    };
    Ok((
        value("tpacct_store_flows_written_total")?,
        value("tpacct_store_pending_flows")?,
        value("tpacct_store_dropped_flows_total")?,
    ))
}
