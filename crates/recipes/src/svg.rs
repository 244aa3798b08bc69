//! Small hand-written SVG charts for the demo report (no plotting dependency).

use std::fmt::Write as _;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Horizontal bars, one per `(label, value)`, scaled to `max` (or the
/// largest value); values are printed at the bar ends.
pub fn bars(title: &str, rows: &[(String, f64)], max: Option<f64>) -> String {
    let (label_w, bar_w, row_h, top) = (220.0, 360.0, 20.0, 36.0);
    let finite: Vec<f64> = rows.iter().map(|r| r.1).filter(|v| v.is_finite()).collect();
    let hi = max
        .unwrap_or_else(|| finite.iter().copied().fold(0.0, f64::max))
        .max(f64::MIN_POSITIVE);
    let height = top + row_h * rows.len() as f64 + 12.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = label_w + bar_w + 70.0
    );
    let _ = writeln!(
        s,
        r#"<text x="8" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = top + i as f64 * row_h;
        let w = if v.is_finite() {
            (v / hi).clamp(0.0, 1.0) * bar_w
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            r##"<text x="{lx}" y="{ty:.1}" text-anchor="end">{l}</text><rect x="{label_w}" y="{y:.1}" width="{w:.1}" height="{h:.1}" fill="#4a7fb5"/><text x="{vx:.1}" y="{ty:.1}">{v:.3}</text>"##,
            lx = label_w - 6.0,
            ty = y + row_h * 0.7,
            l = escape(label),
            h = row_h - 5.0,
            vx = label_w + w + 4.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_to_the_maximum_and_escape_labels() {
        let s = bars(
            "t<1>",
            &[
                ("a&b".into(), 0.5),
                ("c".into(), 1.0),
                ("nan".into(), f64::NAN),
            ],
            Some(1.0),
        );
        assert!(s.contains("t&lt;1&gt;") && s.contains("a&amp;b"));
        assert!(s.contains(r#"width="180.0""#), "half of 360: {s}");
        assert!(s.contains(r#"width="360.0""#));
        assert!(s.contains(r#"width="0.0""#), "NaN draws no bar");
    }
}
