//! `cargo xtask plot`: the classifier bench's JSON (`target/bench/classifier.json`) as an SVG
//! line chart of ns/packet against the size of the prefix set, beside its two peers measured in
//! the same run (the empty XDP program, the floor; one plain LPM lookup over the same prefixes).
//! Hand-written SVG: no plotting crate, no fonts but the viewer's sans-serif.

use std::{fmt::Write, path::Path};

use anyhow::{Context, Result, bail};

/// One point of the chart: a set size and the three programs' ns/packet there.
#[derive(Debug, PartialEq)]
pub(crate) struct Point {
    pub prefixes: u64,
    pub xdpfw: f64,
    pub floor: f64,
    pub plain: Option<f64>,
}

/// The rows of the IPv4 scaling series (`N prefixes, 1 rule`), by set size.
pub(crate) fn points(bench: &serde_json::Value) -> Result<Vec<Point>> {
    let rows = bench.as_array().context("the bench JSON is an array of rows")?;
    let mut pts: Vec<Point> = rows
        .iter()
        .filter(|r| r["ruleset"].as_str().is_some_and(|n| n.ends_with(" prefixes, 1 rule") && !n.contains("IPv6")))
        .map(|r| {
            Ok(Point {
                prefixes: r["prefixes"].as_u64().context("prefixes")?,
                xdpfw: r["ns_per_packet"].as_f64().context("ns_per_packet")?,
                floor: r["floor_ns"].as_f64().context("floor_ns")?,
                plain: r["plain_ns"].as_f64(),
            })
        })
        .collect::<Result<_>>()?;
    pts.sort_by_key(|p| p.prefixes);
    if pts.len() < 2 {
        bail!("the bench JSON has {} rows of the \"N prefixes, 1 rule\" series; a chart needs two", pts.len());
    }
    Ok(pts)
}

fn size_label(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The chart. Set sizes are evenly spaced (they grow by orders of magnitude, and 0 has no log).
pub(crate) fn svg(points: &[Point], title: &str) -> String {
    let (w, h) = (760.0, 420.0);
    let (left, right, top, bottom) = (64.0, 200.0, 48.0, 56.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let max = points.iter().flat_map(|p| [p.xdpfw, p.floor, p.plain.unwrap_or(0.0)]).fold(0.0, f64::max);
    // A round top: the next multiple of 20 ns (or of a power of ten for larger values).
    let step = if max <= 200.0 { 20.0 } else { 10f64.powf(max.log10().floor()) };
    let ymax = ((max / step).floor() + 1.0) * step;
    let x = |i: usize| left + if points.len() == 1 { pw / 2.0 } else { pw * i as f64 / (points.len() - 1) as f64 };
    let y = |v: f64| top + ph * (1.0 - v / ymax);

    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#);
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#, left + pw / 2.0, esc(title));
    // Grid and y axis.
    let mut v = 0.0;
    while v <= ymax + 1e-9 {
        let yy = y(v);
        let _ = writeln!(s, r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##, left + pw);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v}</text>"#, left - 8.0, yy + 4.0);
        v += step;
    }
    let _ = writeln!(s, r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">ns per packet</text>"#, top + ph / 2.0, top + ph / 2.0);
    // X axis: one tick per set size.
    for (i, p) in points.iter().enumerate() {
        let _ = writeln!(s, r##"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#888"/>"##, x(i), top + ph, x(i), top + ph + 5.0);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, x(i), top + ph + 20.0, size_label(p.prefixes));
    }
    let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">IPv4 prefixes in the set (one rule)</text>"#, left + pw / 2.0, h - 12.0);
    let _ = writeln!(s, r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#444"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#444"/>"##, top + ph, top + ph, left + pw, top + ph);
    // The series, each a polyline with a dot per value and the value beside the last one.
    let series: [(&str, &str, Vec<Option<f64>>); 3] = [
        ("xdpfw", "#d62728", points.iter().map(|p| Some(p.xdpfw)).collect()),
        ("plain LPM lookup", "#1f77b4", points.iter().map(|p| p.plain).collect()),
        ("empty program (floor)", "#7f7f7f", points.iter().map(|p| Some(p.floor)).collect()),
    ];
    for (k, (name, colour, values)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64, f64)> = values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (x(i), y(v), v))).collect();
        if pts.is_empty() {
            continue;
        }
        let line: Vec<String> = pts.iter().map(|(px, py, _)| format!("{px:.1},{py:.1}")).collect();
        let _ = writeln!(s, r#"<polyline class="series" data-name="{}" fill="none" stroke="{colour}" stroke-width="2.5" points="{}"/>"#, esc(name), line.join(" "));
        for (px, py, v) in &pts {
            let _ = writeln!(s, r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{colour}"><title>{} {v:.0} ns</title></circle>"#, esc(name));
        }
        // The legend, right of the plot.
        let ly = top + 10.0 + 22.0 * k as f64;
        let lx = left + pw + 16.0;
        let _ = writeln!(s, r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2.5"/>"#, lx + 20.0);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{:.1}">{}</text>"#, lx + 26.0, ly + 4.0, esc(name));
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555">BPF_PROG_TEST_RUN, medians;</text><text x="{:.1}" y="{:.1}" font-size="11" fill="#555">compare within one run</text>"##,
        left + pw + 16.0,
        top + 90.0,
        left + pw + 16.0,
        top + 104.0
    );
    s.push_str("</svg>\n");
    s
}

/// Reads the bench JSON at `input`, writes the chart to `output`.
pub(crate) fn plot(input: &Path, output: &Path) -> Result<()> {
    let text = std::fs::read_to_string(input).with_context(|| format!("reading {} (run `sudo ./run bench` first)", input.display()))?;
    let bench: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", input.display()))?;
    let svg = svg(&points(&bench)?, "Classifier cost against prefix-set size");
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(output, svg).with_context(|| format!("writing {}", output.display()))?;
    println!("{}", output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench() -> serde_json::Value {
        serde_json::json!([
            {"ruleset": "1000 prefixes, 1 rule", "prefixes": 1000, "ns_per_packet": 64.0, "floor_ns": 32.0, "plain_ns": 75.0},
            {"ruleset": "0 prefixes, 1 rule", "prefixes": 0, "ns_per_packet": 52.0, "floor_ns": 32.0, "plain_ns": 45.0},
            {"ruleset": "1000000 prefixes, 1 rule", "prefixes": 1000000, "ns_per_packet": 60.0, "floor_ns": 34.0, "plain_ns": 114.0},
            {"ruleset": "1000000 IPv6 prefixes, 1 rule", "prefixes": 1000000, "ns_per_packet": 74.0, "floor_ns": 34.0, "plain_ns": null},
            {"ruleset": "1000000 prefixes + 10 rules", "prefixes": 1000000, "ns_per_packet": 77.0, "floor_ns": 33.0, "plain_ns": 120.0}
        ])
    }

    #[test]
    fn the_scaling_rows_in_order_of_size() {
        let p = points(&bench()).unwrap();
        assert_eq!(p.iter().map(|p| p.prefixes).collect::<Vec<_>>(), [0, 1000, 1_000_000]);
        assert_eq!(p[2], Point { prefixes: 1_000_000, xdpfw: 60.0, floor: 34.0, plain: Some(114.0) });
        assert!(points(&serde_json::json!([])).is_err());
    }

    #[test]
    fn three_series_higher_values_higher_up() {
        let s = svg(&points(&bench()).unwrap(), "t");
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline class=\"series\"").count(), 3);
        for label in ["0", "1k", "1M"] {
            assert!(s.contains(&format!(">{label}</text>")), "{label}");
        }
        // The plain LPM's last point (114 ns) sits above (smaller y) xdpfw's (60 ns).
        let last_y = |name: &str| -> f64 {
            let line = s.lines().find(|l| l.contains(&format!("data-name=\"{name}\""))).unwrap();
            let pts = line.split("points=\"").nth(1).unwrap().trim_end_matches("\"/>");
            pts.split(' ').next_back().unwrap().split(',').nth(1).unwrap().parse().unwrap()
        };
        assert!(last_y("plain LPM lookup") < last_y("xdpfw") && last_y("xdpfw") < last_y("empty program (floor)"));
    }

    /// docs/classifier.svg is drawn from docs/classifier.json by this code (`cargo xtask plot
    /// --input docs/classifier.json --output docs/classifier.svg`).
    #[test]
    fn the_committed_picture_is_up_to_date() {
        let root = crate::root_dir();
        let bench: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root.join("docs/classifier.json")).unwrap()).unwrap();
        let want = svg(&points(&bench).unwrap(), "Classifier cost against prefix-set size");
        assert_eq!(std::fs::read_to_string(root.join("docs/classifier.svg")).unwrap(), want, "regenerate with cargo xtask plot --input docs/classifier.json --output docs/classifier.svg");
    }
}
