//! A small SVG writer for the analysis figures: annotated heatmaps (overlap
//! and perturbation matrices, FuncScore per layer) and line charts (the
//! sparsity curve). Plain strings, no dependencies; text is XML-escaped.

use std::fmt::Write as _;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// White → blue for `t ∈ [0, 1]`; diverging blue (−1) / white (0) / red (+1) when `signed`.
fn colour(t: f64, signed: bool) -> String {
    let t = if t.is_finite() { t } else { 0.0 };
    let mix = |a: (f64, f64, f64), b: (f64, f64, f64), s: f64| {
        let s = s.clamp(0.0, 1.0);
        (
            a.0 + (b.0 - a.0) * s,
            a.1 + (b.1 - a.1) * s,
            a.2 + (b.2 - a.2) * s,
        )
    };
    let white = (255.0, 255.0, 255.0);
    let (r, g, b) = if signed && t < 0.0 {
        mix(white, (33.0, 102.0, 172.0), -t)
    } else if signed {
        mix(white, (178.0, 24.0, 43.0), t)
    } else {
        mix(white, (8.0, 48.0, 107.0), t)
    };
    format!("rgb({:.0},{:.0},{:.0})", r, g, b)
}

/// An annotated heatmap. Colours span `[min, max]` of the values (or
/// `[-a, a]` with `a = max |value|` when `signed`); `fmt` writes each cell's label.
pub fn heatmap(
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    signed: bool,
    fmt: impl Fn(f64) -> String,
) -> String {
    let (cell_w, cell_h, left, top) = (78.0, 34.0, 130.0, 70.0);
    let w = left + cell_w * cols.len() as f64 + 20.0;
    let h = top + cell_h * rows.len() as f64 + 20.0;
    let finite = values.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let amax = lo.abs().max(hi.abs()).max(1e-300);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.0}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        10.0,
        esc(title)
    );
    for (j, c) in cols.iter().enumerate() {
        let x = left + cell_w * (j as f64 + 0.5);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            top - 8.0,
            esc(c)
        );
    }
    for (i, r) in rows.iter().enumerate() {
        let y = top + cell_h * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 8.0,
            y + cell_h * 0.6,
            esc(r)
        );
        for (j, v) in values
            .get(i)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .take(cols.len())
        {
            let t = if signed {
                v / amax
            } else if hi > lo {
                (v - lo) / (hi - lo)
            } else {
                0.0
            };
            let x = left + cell_w * j as f64;
            let ink = if t.abs() > 0.6 { "white" } else { "black" };
            let _ = writeln!(
                s,
                r##"<rect x="{x:.1}" y="{y:.1}" width="{cell_w}" height="{cell_h}" fill="{}" stroke="#ccc"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="{ink}">{}</text>"##,
                colour(t, signed),
                x + cell_w / 2.0,
                y + cell_h * 0.6,
                esc(&fmt(*v))
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// A line chart of named series of `(x, y)` points, with axes and a legend.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 400.0, 70.0, 150.0, 40.0, 50.0);
    let pts = series
        .iter()
        .flat_map(|(_, p)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1.partial_cmp(&x0) != Some(std::cmp::Ordering::Greater) {
        x1 = x0 + 1.0;
    }
    if y1.partial_cmp(&y0) != Some(std::cmp::Ordering::Greater) {
        y1 = y0 + 1.0;
    }
    let (pw, ph) = (w - left - right, h - top - bottom);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
    let palette = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    ];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + ph,
        left + pw,
        top + ph
    );
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/>"#,
        top + ph
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(fx),
            top + ph + 16.0,
            short(fx)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 6.0,
            py(fy) + 4.0,
            short(fy)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            py(fy),
            left + pw,
            py(fy)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        top + ph / 2.0,
        top + ph / 2.0,
        esc(y_label)
    );
    for (k, (name, p)) in series.iter().enumerate() {
        let c = palette[k % palette.len()];
        let path: Vec<String> = p
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        let ly = top + 16.0 * k as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="12" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}">{}</text>"##,
            left + pw + 12.0,
            ly,
            left + pw + 30.0,
            ly + 10.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
