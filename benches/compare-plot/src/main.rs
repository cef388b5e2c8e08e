//! Draws benches/compare's plots from its results.json: one-way latency (median) and bandwidth by
//! message size, verbs in the Soft-RoCE guest on the left, shared memory on the host on the right.
//!
//! Usage: rsmsg-compare-plot RESULTS.json OUT_DIR   (writes compare-lat.svg and compare-bw.svg)

use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

/// One line of a plot: a tool's figures by size.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
}

fn series(
    records: &[Value],
    side: &str,
    tool: &str,
    test: &str,
    key: &str,
    label: &str,
) -> Option<Series> {
    let mut by_size: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for r in records {
        let field = |k: &str| r.get(k).and_then(Value::as_str);
        if field("side") == Some(side)
            && field("tool") == Some(tool)
            && field("test") == Some(test)
            && let (Some(s), Some(v)) = (
                r.get("size").and_then(Value::as_u64),
                r.get(key).and_then(Value::as_f64),
            )
            && v > 0.0
        {
            by_size.entry(s).or_default().push(v);
        }
    }
    let points: Vec<(f64, f64)> = by_size
        .into_iter()
        .map(|(s, mut v)| {
            v.sort_by(f64::total_cmp);
            (s as f64, v[v.len() / 2])
        })
        .collect();
    (!points.is_empty()).then(|| Series {
        label: label.to_string(),
        points,
    })
}

const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
];

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    lines: &[Series],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    if lines.is_empty() {
        area.titled(&format!("{title}: no data"), ("sans-serif", 18))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok(());
    }
    let all = lines.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (x0 / 1.5..x1 * 1.5).log_scale(),
            (y0 / 1.5..y1 * 1.5).log_scale(),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("message size (bytes)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| {
            // Decimal ticks of a log axis: 10, 100, 1k, 10k, 100k, 1M.
            let n = x.round();
            if n >= 1e6 {
                format!("{}M", n / 1e6)
            } else if n >= 1e3 {
                format!("{}k", n / 1e3)
            } else {
                format!("{n}")
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, s) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn plot(path: &Path, title: &str, left: (&str, &[Series]), right: (&str, &[Series])) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (l, r) = root.split_horizontally(600);
    panel(&l, left.0, title_unit(title), left.1)?;
    panel(&r, right.0, title_unit(title), right.1)?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn title_unit(title: &str) -> &'static str {
    if title.contains("latency") {
        "one-way latency, median (us)"
    } else {
        "bandwidth (MB/s)"
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, results, out] = args.as_slice() else {
        bail!("usage: rsmsg-compare-plot RESULTS.json OUT_DIR");
    };
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(results).with_context(|| format!("reading {results}"))?,
    )
    .with_context(|| format!("parsing {results}"))?;
    let records = v["records"]
        .as_array()
        .context("results.json has no records")?;
    let date = v["date"].as_str().unwrap_or("?");
    let out = Path::new(out);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let s = |side, tool, test, key, label| series(records, side, tool, test, key, label);
    let guest_lat: Vec<Series> = [
        s("guest", "ib_write_lat", "lat", "p50_us", "ib_write_lat"),
        s("guest", "ucx_am", "lat", "p50_us", "UCX ucp_am_lat"),
        s(
            "guest",
            "fi_pingpong",
            "lat",
            "avg_us",
            "fi_pingpong (average)",
        ),
        s("guest", "rsmsg", "lat", "p50_us", "rsmsg"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let host_lat: Vec<Series> = [
        s("host", "ucx_am", "lat", "p50_us", "UCX posix"),
        s("host", "rsmsg", "lat", "p50_us", "rsmsg shm"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let guest_bw: Vec<Series> = [
        s("guest", "ib_write_bw", "bw", "bw_mbps", "ib_write_bw"),
        s("guest", "ucx_am", "bw", "bw_mbps", "UCX ucp_am_bw"),
        s("guest", "rsmsg", "bw", "bw_mbps", "rsmsg"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let host_bw: Vec<Series> = [
        s("host", "ucx_am", "bw", "bw_mbps", "UCX posix"),
        s("host", "rsmsg", "bw", "bw_mbps", "rsmsg shm"),
    ]
    .into_iter()
    .flatten()
    .collect();
    plot(
        &out.join("compare-lat.svg"),
        &format!("One-way latency by size ({date})"),
        ("verbs, Soft-RoCE guest (emulated: ratios only)", &guest_lat),
        ("shared memory, host", &host_lat),
    )?;
    plot(
        &out.join("compare-bw.svg"),
        &format!("Bandwidth by size ({date})"),
        ("verbs, Soft-RoCE guest (emulated: ratios only)", &guest_bw),
        ("shared memory, host", &host_bw),
    )?;
    println!(
        "wrote {} and {}",
        out.join("compare-lat.svg").display(),
        out.join("compare-bw.svg").display()
    );
    Ok(())
}
