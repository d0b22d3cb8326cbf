//! The routing micro-bench: runs `cargo bench -p tpacct --bench routing` (release) and turns
//! its lines into a markdown table and JSON rows for the report.

use anyhow::{Result, bail};

/// One size's figures: (rules, decisions/s, p50 ns, p99 ns, build ms, RSS growth bytes).
pub(super) type Row = (u64, f64, f64, f64, f64, f64);

pub(super) fn run(quick: bool) -> Result<Vec<Row>> {
    let out = super::cargo_bench("routing", quick, &[])?;
    let rows = out
        .lines()
        .filter_map(|line| {
            let n: Vec<f64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            (n.len() == 6).then(|| (n[0] as u64, n[1], n[2], n[3], n[4], n[5]))
        })
        .collect::<Vec<Row>>();
    if rows.is_empty() {
        bail!("routing bench printed no figures");
    }
    Ok(rows)
}

pub(super) fn markdown(rows: &[Row]) -> String {
    let mut md = String::from(
        "\n### Routing decisions (`cargo bench -p tpacct --bench routing`)\n\n\
         The real config parser, rule build and `Router::route` per flow, over hosts and \
         addresses that match early, late and not at all.\n\n\
         | rules | decisions/s | p50 | p99 | build | memory |\n|---|---|---|---|---|---|\n",
    );
    for (n, per_s, p50, p99, build, rss) in rows {
        md.push_str(&format!(
            "| {n} | {:.2} M | {p50:.0} ns | {p99:.0} ns | {build:.0} ms | {:.1} MB |\n",
            per_s / 1e6,
            rss / 1e6
        ));
    }
    md
}

pub(super) fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|(n, per_s, p50, p99, build, rss)| {
            format!(
                "    {{\"rules\": {n}, \"decisions_per_s\": {per_s}, \"p50_ns\": {p50}, \"p99_ns\": {p99}, \"build_ms\": {build}, \"rss_bytes\": {rss}}}"
            )
        })
        .collect();
    format!("  \"routing\": [\n{}\n  ],\n", items.join(",\n"))
}
