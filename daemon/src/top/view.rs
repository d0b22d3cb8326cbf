//! How `top` draws a [`Model`]: a header line, the devices, then the live flows.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Row, Table},
};

use super::model::Model;

/// Bytes in binary units, one decimal.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn rate(per_s: f64) -> String {
    format!("{}/s", bytes(per_s.round() as u64))
}

fn optional(n: Option<u64>) -> String {
    n.map_or_else(|| "-".to_owned(), bytes)
}

pub fn draw(f: &mut Frame, m: &Model) {
    let device_rows = (m.devices.len() as u16).clamp(1, 12) + 3;
    let [head, devices, flows] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(device_rows),
        Constraint::Min(3),
    ])
    .areas(f.area());
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = vec![Line::styled(
        format!(
            "tpacctd top  {}  {} flows  ↑ {}  ↓ {}  (since start ↑ {} ↓ {})",
            m.controller,
            m.flows.len(),
            rate(m.rates.0),
            rate(m.rates.1),
            bytes(m.totals.0),
            bytes(m.totals.1)
        ),
        bold,
    )];
    lines.push(Line::raw(match &m.error {
        Some(e) => format!("error: {e}"),
        None => format!("flows by {} (s: change)  q: quit", m.sort.name()),
    }));
    f.render_widget(ratatui::widgets::Paragraph::new(lines), head);

    let title = if m.history {
        "Devices (today and this month in UTC)"
    } else {
        "Devices (live flows only: history is off)"
    };
    let rows = m.devices.iter().map(|d| {
        Row::new([
            d.name.clone(),
            d.ips.clone(),
            d.flows.to_string(),
            rate(d.rate.0),
            rate(d.rate.1),
            optional(d.today),
            optional(d.month),
            bytes(d.total),
        ])
    });
    let widget = table(
        rows,
        &[
            ("device", Constraint::Min(17)),
            ("addresses", Constraint::Min(12)),
            ("flows", Constraint::Length(5)),
            ("↑ now", Constraint::Length(12)),
            ("↓ now", Constraint::Length(12)),
            ("today", Constraint::Length(10)),
            ("month", Constraint::Length(10)),
            ("total", Constraint::Length(10)),
        ],
        title,
    );
    f.render_widget(widget, devices);

    let rows = m.flows.iter().map(|c| {
        Row::new([
            Cell::from(c.target.clone()),
            Cell::from(c.source.clone()),
            Cell::from(c.network.clone()),
            Cell::from(c.rule.clone()),
            Cell::from(c.chain.clone()),
            Cell::from(rate(c.rate.0)),
            Cell::from(rate(c.rate.1)),
            Cell::from(bytes(c.bytes.0)),
            Cell::from(bytes(c.bytes.1)),
        ])
    });
    let widget = table(
        rows,
        &[
            ("destination", Constraint::Min(20)),
            ("source", Constraint::Length(15)),
            ("net", Constraint::Length(4)),
            ("rule", Constraint::Min(10)),
            ("chain", Constraint::Min(8)),
            ("↑ now", Constraint::Length(12)),
            ("↓ now", Constraint::Length(12)),
            ("↑", Constraint::Length(10)),
            ("↓", Constraint::Length(10)),
        ],
        "Live flows",
    );
    f.render_widget(widget, flows);
}

/// A bordered table titled `title`, its columns as (header, width).
fn table<'a>(
    rows: impl IntoIterator<Item = Row<'a>>,
    columns: &[(&'a str, Constraint)],
    title: &'a str,
) -> Table<'a> {
    Table::new(rows, columns.iter().map(|c| c.1))
        .header(
            Row::new(columns.iter().map(|c| c.0)).style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::bordered().title(title))
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn sizes_read_like_a_human_wrote_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }
}
