//! `target/bench/report.{md,json}` and `ratios.svg`: what `cargo xtask bench`
//! measured, where and when, each figure with its unit and its ratio to the
//! reference (PyTorch, PEFT or k-means-constrained, same machine, same run).
//! Hand-written JSON and SVG: xtask has no dependencies.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Figure, fmt_s};

/// Where and when the figures were taken.
#[derive(Debug, Clone)]
pub struct Meta {
    pub host: String,
    pub cpu: String,
    pub cores: usize,
    pub os: String,
    pub revision: String,
    pub date_utc: String,
    pub quick: bool,
    pub topics: Vec<String>,
}

impl Meta {
    pub fn collect(root: &Path, quick: bool, topics: &[String]) -> Self {
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        let mut revision =
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty()) {
            revision.push_str("+dirty");
        }
        Self {
            host: fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            revision,
            date_utc: utc_now(),
            quick,
            topics: topics.to_vec(),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` from the system clock (civil-from-days, proleptic Gregorian).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn json_num(x: Option<f64>) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.6e}"),
        _ => "null".into(),
    }
}

pub fn json(meta: &Meta, figures: &[Figure]) -> String {
    let mut j = String::from("{\n");
    let _ = writeln!(j, "  \"host\": {},", json_escape(&meta.host));
    let _ = writeln!(j, "  \"cpu\": {},", json_escape(&meta.cpu));
    let _ = writeln!(j, "  \"cores\": {},", meta.cores);
    let _ = writeln!(j, "  \"os\": {},", json_escape(&meta.os));
    let _ = writeln!(j, "  \"revision\": {},", json_escape(&meta.revision));
    let _ = writeln!(j, "  \"date\": {},", json_escape(&meta.date_utc));
    let _ = writeln!(j, "  \"quick\": {},", meta.quick);
    let topics: Vec<String> = meta.topics.iter().map(|t| json_escape(t)).collect();
    let _ = writeln!(j, "  \"topics\": [{}],", topics.join(", "));
    j.push_str("  \"figures\": [\n");
    for (i, f) in figures.iter().enumerate() {
        let _ = write!(
            j,
            "    {{\"case\": {}, \"unit\": \"s/iter\", \"rust\": {}, \"reference\": {}, \"ratio\": {}, \"ratio_meaning\": \"reference / rust (above 1 = rust faster)\"}}",
            json_escape(&f.case),
            json_num(Some(f.rust_s)),
            json_num(f.reference_s),
            json_num(f.ratio())
        );
        j.push_str(if i + 1 < figures.len() { ",\n" } else { "\n" });
    }
    j.push_str("  ]\n}\n");
    j
}

pub fn markdown(meta: &Meta, figures: &[Figure]) -> String {
    let mut md = String::from("# Benchmark report (`cargo xtask bench`)\n\n");
    let _ = writeln!(
        md,
        "Host `{}` ({}, {} cores, {}), revision `{}`, {}{}.\n",
        meta.host,
        meta.cpu,
        meta.cores,
        meta.os,
        meta.revision,
        meta.date_utc,
        if meta.quick {
            ", `--quick` (short criterion runs: indicative only)"
        } else {
            ""
        }
    );
    md.push_str(
        "Each figure is criterion's median time per iteration of our code and the mean of the reference \
         script's two runs (before and after ours) on the same machine; ratio = reference / ours, above 1 = \
         we are faster. The reference of each case is named in its `benches/TOPIC.rs` header.\n\n",
    );
    md.push_str("![ratios](ratios.svg)\n\n");
    let mut topic = "";
    for f in figures {
        let t = f.case.split('/').next().unwrap_or("");
        if t != topic {
            topic = t;
            let _ = writeln!(
                md,
                "\n## {t}\n\n| case | ours | reference | ratio |\n|---|---:|---:|---:|"
            );
        }
        let case = f.case.split_once('/').map_or(f.case.as_str(), |x| x.1);
        let _ = writeln!(
            md,
            "| {case} | {} | {} | {} |",
            fmt_s(f.rust_s),
            f.reference_s.map_or("-".into(), fmt_s),
            f.ratio().map_or("-".into(), |r| format!("{r:.2}x"))
        );
    }
    md
}

/// Horizontal bars of `log2(ratio)` around 1x for the cases with a reference.
pub fn svg(figures: &[Figure]) -> String {
    let rows: Vec<(&str, f64)> = figures
        .iter()
        .filter_map(|f| f.ratio().filter(|r| *r > 0.0).map(|r| (f.case.as_str(), r)))
        .collect();
    let (label_w, bar_w, row_h, top) = (330.0, 420.0, 18.0, 40.0);
    let height = top + row_h * rows.len().max(1) as f64 + 30.0;
    let max_log = rows
        .iter()
        .map(|(_, r)| r.log2().abs())
        .fold(1.0_f64, f64::max)
        .ceil();
    let x0 = label_w + bar_w / 2.0;
    let scale = (bar_w / 2.0) / max_log;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="11">"#,
        w = label_w + bar_w + 70.0
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="13">reference time / our time (log scale; right of the line = we are faster)</text>"#
    );
    for k in -(max_log as i64)..=(max_log as i64) {
        let x = x0 + k as f64 * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{y1}" x2="{x:.1}" y2="{y2:.1}" stroke="{c}" stroke-width="1"/><text x="{x:.1}" y="{ty:.1}" text-anchor="middle" fill="#555">{lab}</text>"##,
            y1 = top - 8.0,
            y2 = height - 24.0,
            c = if k == 0 { "#000" } else { "#ddd" },
            ty = height - 10.0,
            lab = if k >= 0 {
                format!("{}x", 1i64 << k)
            } else {
                format!("1/{}x", 1i64 << -k)
            }
        );
    }
    for (i, (case, r)) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let v = r.log2().clamp(-max_log, max_log) * scale;
        let (x, w) = if v >= 0.0 { (x0, v) } else { (x0 + v, -v) };
        let _ = writeln!(
            s,
            r##"<text x="{lx}" y="{ty:.1}" text-anchor="end">{name}</text><rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="{c}"/><text x="{vx:.1}" y="{ty:.1}">{r:.2}x</text>"##,
            lx = label_w - 6.0,
            ty = y + row_h * 0.7,
            name = xml_escape(case),
            h = row_h - 4.0,
            c = if *r >= 1.0 { "#4a8" } else { "#d65" },
            vx = label_w + bar_w + 6.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Write the three files atomically (temporary name, then rename).
pub fn write(dir: &Path, meta: &Meta, figures: &[Figure]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for (name, text) in [
        ("report.md", markdown(meta, figures)),
        ("report.json", json(meta, figures)),
        ("ratios.svg", svg(figures)),
    ] {
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figs() -> Vec<Figure> {
        vec![
            Figure {
                case: "t/a".into(),
                rust_s: 0.5,
                reference_s: Some(1.0),
            },
            Figure {
                case: "t/b\"q".into(),
                rust_s: 2.0,
                reference_s: None,
            },
        ]
    }

    fn meta() -> Meta {
        Meta {
            host: "h".into(),
            cpu: "c".into(),
            cores: 2,
            os: "linux".into(),
            revision: "abc".into(),
            date_utc: "2026-01-01T00:00:00Z".into(),
            quick: true,
            topics: vec!["t".into()],
        }
    }

    #[test]
    fn json_has_every_figure_with_ratio_and_escapes() {
        let j = json(&meta(), &figs());
        assert!(j.contains("\"ratio\": 2.000000e0"), "{j}");
        assert!(j.contains("\"reference\": null, \"ratio\": null"), "{j}");
        assert!(j.contains("t/b\\\"q"), "{j}");
    }

    #[test]
    fn markdown_and_svg_list_the_cases() {
        let md = markdown(&meta(), &figs());
        assert!(md.contains("| a | 500.00 ms | 1.00 s | 2.00x |"), "{md}");
        let s = svg(&figs());
        assert!(s.contains("2.00x") && s.starts_with("<svg"), "{s}");
        assert!(!s.contains("b\"q"), "only cases with a reference are drawn");
    }

    #[test]
    fn utc_date_is_well_formed() {
        let d = utc_now();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'));
    }
}
