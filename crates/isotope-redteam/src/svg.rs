//! Minimal line charts as inline SVG. Hand-written rather than plotters: plotters'
//! text needs a TTF font (font-kit/fontconfig), which a fresh Debian lacks, while SVG
//! text is laid out by the browser — so these charts have axis labels and legends.

use std::fmt::Write;

/// One line.
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
    /// Draw a dot at every point (sparse series).
    pub dots: bool,
}

/// A chart: lines, optional vertical markers and one horizontal reference line.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
    /// (x, label, colour)
    pub vlines: Vec<(f64, String, &'static str)>,
    /// (y, label)
    pub hline: Option<(f64, String)>,
}

const W: f64 = 760.0;
const H: f64 = 380.0;
const L: f64 = 70.0;
const R: f64 = 20.0;
const T: f64 = 40.0;
const B: f64 = 50.0;

/// A "nice" tick step for a range of `span` with about `n` ticks.
fn step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let finite: Vec<(f64, f64)> = pts
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .copied()
            .collect();
        let mut x0 = finite.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let mut x1 = finite.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        for (x, _, _) in &self.vlines {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
        }
        let mut y0 = finite
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min)
            .min(0.0);
        let mut y1 = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        if let Some((y, _)) = &self.hline {
            y1 = y1.max(*y * 1.15);
            y0 = y0.min(*y);
        }
        if !x0.is_finite() || !x1.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if !y1.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        let y1 = y1 + (y1 - y0) * 0.05;
        let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
        let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(
            s,
            r#"<rect width="{W}" height="{H}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            W / 2.0,
            esc(self.title)
        );
        // Grid and ticks.
        let xs = step(x1 - x0, 6.0);
        let mut x = (x0 / xs).ceil() * xs;
        while x <= x1 + 1e-9 {
            let px = sx(x);
            let _ = write!(
                s,
                r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#e4e4e4"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - B,
                H - B + 16.0,
                fmt_tick(x)
            );
            x += xs;
        }
        let ys = step(y1 - y0, 5.0);
        let mut y = (y0 / ys).ceil() * ys;
        while y <= y1 + 1e-9 {
            let py = sy(y);
            let _ = write!(
                s,
                r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                py + 4.0,
                fmt_tick(y)
            );
            y += ys;
        }
        let _ = write!(
            s,
            r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
            W - L - R,
            H - T - B
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (L + W - R) / 2.0,
            H - 12.0,
            esc(self.x_label),
            (T + H - B) / 2.0,
            esc(self.y_label)
        );
        if let Some((yv, label)) = &self.hline {
            let py = sy(*yv);
            let _ = write!(
                s,
                r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="#c00" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" text-anchor="end" fill="#c00">{}</text>"##,
                W - R,
                W - R - 4.0,
                py - 4.0,
                esc(label)
            );
        }
        for (i, (xv, label, color)) in self.vlines.iter().enumerate() {
            let px = sx(*xv);
            let _ = write!(
                s,
                r#"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="{color}" stroke-dasharray="3 3"/><text x="{:.1}" y="{}" fill="{color}" font-size="10">{}</text>"#,
                H - B,
                px + 3.0,
                T + 12.0 + 12.0 * (i % 6) as f64,
                esc(label)
            );
        }
        for (i, se) in self.series.iter().enumerate() {
            let path: Vec<String> = se
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            if !path.is_empty() {
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{}" stroke-width="2" {} points="{}"/>"#,
                    se.color,
                    if se.dashed {
                        r#"stroke-dasharray="7 4""#
                    } else {
                        ""
                    },
                    path.join(" ")
                );
            }
            if se.dots {
                for &(x, y) in se
                    .points
                    .iter()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                {
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                        sx(x),
                        sy(y),
                        se.color
                    );
                }
            }
            let ly = T + 14.0 + 16.0 * i as f64;
            let _ = write!(
                s,
                r#"<line x1="{}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{}" stroke-width="3" {}/><text x="{}" y="{:.1}">{}</text>"#,
                L + 10.0,
                L + 34.0,
                se.color,
                if se.dashed {
                    r#"stroke-dasharray="7 4""#
                } else {
                    ""
                },
                L + 40.0,
                ly + 4.0,
                esc(&se.name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_valid_looking_svg_with_labels_and_escapes() {
        let c = Chart {
            title: "p <vs> tokens",
            x_label: "tokens",
            y_label: "-log10 p",
            series: vec![Series {
                name: "a & b".into(),
                color: "#123456",
                points: vec![(0.0, 1.0), (10.0, f64::NAN), (20.0, 3.0)],
                dashed: true,
                dots: true,
            }],
            vlines: vec![(5.0, "flag".into(), "#f00")],
            hline: Some((3.0, "p = 1e-3".into())),
        };
        let s = c.render();
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("p &lt;vs&gt; tokens") && s.contains("a &amp; b"));
        assert_eq!(s.matches("<circle").count(), 2, "NaN points are skipped");
        // An empty chart still renders.
        let empty = Chart {
            title: "",
            x_label: "",
            y_label: "",
            series: vec![],
            vlines: vec![],
            hline: None,
        };
        assert!(empty.render().ends_with("</svg>"));
        assert_eq!(step(97.0, 5.0), 20.0);
    }
}
