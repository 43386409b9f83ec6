//! Spend as pictures: bars beside `capitctl usage` rows in the terminal, and an SVG of spend per
//! day, stacked by grant (or by model for one grant), for `usage --chart FILE.svg`. Amounts stay
//! decimal; only bar lengths and pixel heights are rounded, from decimals.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use chrono::NaiveDate;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde_json::json;

use capit::proto::v1 as pb;

use crate::consumers::files;
use crate::output;

fn spent(text: &str) -> Decimal {
    text.parse().unwrap_or_default()
}

/// The rows of every day from the first to the last, the days without requests at zero.
pub fn every_day(rows: &[pb::UsageRow]) -> Vec<pb::UsageRow> {
    let parse = |r: &pb::UsageRow| NaiveDate::parse_from_str(&r.key, "%Y-%m-%d").ok();
    let (Some(first), Some(last)) = (rows.first().and_then(parse), rows.last().and_then(parse)) else { return rows.to_vec() };
    let by_day: BTreeMap<&str, &pb::UsageRow> = rows.iter().map(|r| (r.key.as_str(), r)).collect();
    first
        .iter_days()
        .take_while(|d| *d <= last)
        .take(3660)
        .map(|d| {
            let key = d.format("%Y-%m-%d").to_string();
            by_day
                .get(key.as_str())
                .map_or_else(|| pb::UsageRow { key: key.clone(), spent: "0".into(), ..Default::default() }, |r| (*r).clone())
        })
        .collect()
}

/// A bar per row, `width` cells for the largest spend, in eighths of a cell.
pub fn bars(rows: &[pb::UsageRow], width: u32) -> Vec<String> {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    let max = rows.iter().map(|r| spent(&r.spent)).max().unwrap_or_default();
    rows.iter()
        .map(|r| {
            if max <= Decimal::ZERO {
                return String::new();
            }
            let eighths = (spent(&r.spent) * Decimal::from(width * 8) / max).round().to_u32().unwrap_or(0);
            let mut bar = "█".repeat((eighths / 8) as usize);
            if !eighths.is_multiple_of(8) {
                bar.push(EIGHTHS[(eighths % 8) as usize]);
            }
            if bar.is_empty() && spent(&r.spent) > Decimal::ZERO {
                bar.push('▏');
            }
            bar
        })
        .collect()
}

/// A round step for `count` gridlines up to at least `max`: 1, 2 or 5 times a power of ten.
fn grid_step(max: Decimal, count: u32) -> Decimal {
    let target = max / Decimal::from(count);
    let mut magnitude = Decimal::new(1, 6);
    loop {
        for m in [1, 2, 5] {
            let step = magnitude * Decimal::from(m);
            if step >= target {
                return step;
            }
        }
        magnitude *= Decimal::TEN;
    }
}

const COLOURS: [&str; 10] = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

fn xml(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The SVG text: a stacked bar per day, one colour per series, with a legend and a dollar axis.
pub fn svg(title: &str, rows: &[pb::DayRow]) -> String {
    let mut days: BTreeMap<String, Vec<(String, Decimal)>> = BTreeMap::new();
    let mut totals: BTreeMap<String, Decimal> = BTreeMap::new();
    for r in rows {
        days.entry(r.day.clone()).or_default().push((r.series.clone(), spent(&r.spent)));
        *totals.entry(r.series.clone()).or_default() += spent(&r.spent);
    }
    // Every day in the range, so gaps show as gaps.
    let keys: Vec<pb::UsageRow> = days.keys().map(|d| pb::UsageRow { key: d.clone(), spent: "0".into(), ..Default::default() }).collect();
    let all_days: Vec<String> = every_day(&keys).into_iter().map(|r| r.key).collect();
    let series: Vec<String> = totals.keys().cloned().collect();
    let colour = |name: &str| COLOURS[series.iter().position(|s| s == name).unwrap_or(0) % COLOURS.len()];
    let day_total = |day: &str| days.get(day).map_or(Decimal::ZERO, |v| v.iter().map(|(_, d)| *d).sum());
    let max = all_days.iter().map(|d| day_total(d)).max().unwrap_or_default();

    let (left, top, plot_h, legend_w) = (70u32, 50u32, 300u32, 220u32);
    let bar_w = (720 / all_days.len().max(1) as u32).clamp(4, 40);
    let plot_w = bar_w * all_days.len().max(1) as u32;
    let (width, height) = (left + plot_w + 20 + legend_w, top + plot_h + 70);
    let step = grid_step(max.max(Decimal::new(1, 2)), 5);
    let axis_max = (max / step).ceil().max(Decimal::ONE) * step;
    let y = |amount: Decimal| -> u32 {
        let px = (amount * Decimal::from(plot_h) / axis_max).round().to_u32().unwrap_or(0);
        px.min(plot_h)
    };

    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n"
    );
    out.push_str(&format!("<rect width=\"{width}\" height=\"{height}\" fill=\"#ffffff\"/>\n"));
    out.push_str(&format!("<text x=\"{left}\" y=\"28\" font-size=\"16\" font-weight=\"bold\">{}</text>\n", xml(title)));
    let mut tick = Decimal::ZERO;
    while tick <= axis_max {
        let ty = top + plot_h - y(tick);
        out.push_str(&format!("<line x1=\"{left}\" y1=\"{ty}\" x2=\"{}\" y2=\"{ty}\" stroke=\"#dddddd\"/>\n", left + plot_w));
        out.push_str(&format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">${}</text>\n", left - 6, ty + 4, capit::grants::money(tick)));
        tick += step;
    }
    for (i, day) in all_days.iter().enumerate() {
        let x = left + i as u32 * bar_w;
        let mut base = Decimal::ZERO;
        for (name, amount) in days.get(day).map(Vec::as_slice).unwrap_or(&[]) {
            let (from, to) = (y(base), y(base + *amount));
            base += *amount;
            if to > from {
                out.push_str(&format!(
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"><title>{} {}: ${}</title></rect>\n",
                    x + 1,
                    top + plot_h - to,
                    bar_w.saturating_sub(2).max(1),
                    to - from,
                    colour(name),
                    day,
                    xml(name),
                    capit::grants::money(*amount)
                ));
            }
        }
        let label_every = (all_days.len() as u32 * 70 / plot_w.max(1)).max(1) as usize;
        if i % label_every == 0 {
            out.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" transform=\"rotate(-45 {} {})\">{}</text>\n",
                x + bar_w / 2,
                top + plot_h + 14,
                x + bar_w / 2,
                top + plot_h + 14,
                day
            ));
        }
    }
    out.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333333\"/>\n",
        top + plot_h,
        left + plot_w,
        top + plot_h
    ));
    for (i, name) in series.iter().enumerate() {
        let ly = top + 6 + i as u32 * 20;
        let lx = left + plot_w + 20;
        out.push_str(&format!("<rect x=\"{lx}\" y=\"{ly}\" width=\"12\" height=\"12\" fill=\"{}\"/>\n", colour(name)));
        out.push_str(&format!("<text x=\"{}\" y=\"{}\">{} ${}</text>\n", lx + 18, ly + 11, xml(name), capit::grants::money(totals[name])));
    }
    out.push_str("</svg>\n");
    out
}

/// `usage --chart FILE.svg`: per grant over time, or per model for one grant. Written atomically.
pub fn write_svg(file: &Path, u: &pb::GetUsageResponse, json: bool) -> anyhow::Result<()> {
    let (title, rows) = if u.grant.is_empty() {
        ("capit: spend per day, by grant".to_string(), &u.by_grant_day)
    } else {
        (format!("capit: spend per day of grant \"{}\", by model", u.grant), &u.by_model_day)
    };
    let text = svg(&title, rows);
    files::write_atomic(file, &text, false).map(drop).with_context(|| format!("writing {}", file.display()))?;
    let first = rows.iter().map(|r| r.day.as_str()).min().unwrap_or("-");
    let last = rows.iter().map(|r| r.day.as_str()).max().unwrap_or("-");
    let series: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.series.as_str()).collect();
    if json {
        output::json(&json!({"chart": file, "from": first, "to": last, "series": series}));
    } else {
        println!("wrote {}: spend per day from {first} to {last}, {} series", file.display(), series.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, spent: &str) -> pb::UsageRow {
        pb::UsageRow { key: key.into(), spent: spent.into(), ..Default::default() }
    }

    #[test]
    fn bars_scale_to_the_largest_and_days_have_no_gaps() {
        let rows = every_day(&[row("2026-11-28", "2"), row("2026-12-01", "0.5")]);
        assert_eq!(rows.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"]);
        assert_eq!(bars(&rows, 4), ["████", "", "", "█"]);
        assert_eq!(bars(&[row("a", "1"), row("b", "0.0001")], 10)[1], "▏");
    }

    #[test]
    fn the_svg_has_a_bar_per_day_and_series() {
        let day = |d: &str, s: &str, spent: &str| pb::DayRow { day: d.into(), series: s.into(), spent: spent.into(), requests: 1 };
        let text = svg("t", &[day("2026-11-01", "claude", "1.5"), day("2026-11-01", "codex", "0.5"), day("2026-11-03", "claude", "3")]);
        assert_eq!(text.matches("<title>").count(), 3);
        assert!(text.contains("<title>2026-11-03 claude: $3.00</title>"));
        assert!(text.contains(">claude $4.50<"));
        assert_eq!(grid_step(Decimal::from(3), 5), "1".parse::<Decimal>().unwrap());
    }
}
