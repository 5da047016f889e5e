//! Line charts as standalone SVG files: one line per series over a log-scale x axis (the
//! number of services spans five decades), a linear or log y axis, a legend on the right.
//! Missing points break their line rather than being bridged.

use std::fmt::Write as _;

/// One line of a chart.
pub struct Series {
    pub name: String,
    /// `#rrggbb`.
    pub color: &'static str,
    pub dashed: bool,
    /// (x, y); `None` where nothing was measured.
    pub points: Vec<(f64, Option<f64>)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 780.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 210.0;
const TOP: f64 = 46.0;
const BOTTOM: f64 = 56.0;

/// A short label for an axis value: 1, 10, 1k, 30k, 1.5M, 0.25.
pub fn short_number(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    let magnitude = value.abs();
    if magnitude >= 1e6 {
        format!("{}M", trim(format!("{:.1}", value / 1e6)))
    } else if magnitude >= 1e3 {
        format!("{}k", trim(format!("{:.1}", value / 1e3)))
    } else if magnitude >= 1.0 || magnitude == 0.0 {
        trim(format!("{value:.1}"))
    } else {
        trim(format!("{value:.3}"))
    }
}

/// Ticks of a linear axis from 0 to at least `max`: steps of 1, 2 or 5 × 10^k, about 5 of
/// them. Returns the ticks (the last is the axis' top).
fn linear_ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 { max } else { 1.0 };
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|s| *s >= rough).unwrap_or(power);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// Powers of ten covering `min..=max` (both positive).
fn log_ticks(min: f64, max: f64) -> Vec<f64> {
    let low = min.log10().floor() as i32;
    let high = (max.log10().ceil() as i32).max(low + 1);
    (low..=high).map(|e| 10f64.powi(e)).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

impl Chart {
    pub fn to_svg(&self) -> String {
        let values = || self.series.iter().flat_map(|s| s.points.iter());
        let xs: Vec<f64> = values().map(|(x, _)| *x).filter(|x| *x > 0.0).collect();
        let ys: Vec<f64> =
            values().filter_map(|(_, y)| *y).filter(|y| !self.log_y || *y > 0.0).collect();
        let x_ticks = log_ticks(
            xs.iter().copied().fold(f64::INFINITY, f64::min).min(1e9),
            xs.iter().copied().fold(1.0, f64::max),
        );
        let y_ticks = if self.log_y {
            log_ticks(
                ys.iter().copied().fold(f64::INFINITY, f64::min).min(1e12),
                ys.iter().copied().fold(f64::MIN_POSITIVE, f64::max),
            )
        } else {
            linear_ticks(ys.iter().copied().fold(0.0, f64::max) * 1.05)
        };
        let (x_low, x_high) = (x_ticks[0].log10(), x_ticks[x_ticks.len() - 1].log10());
        let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let x_at = |x: f64| LEFT + (x.log10() - x_low) / (x_high - x_low) * plot_w;
        let y_at = |y: f64| {
            let (low, high) = (y_ticks[0], y_ticks[y_ticks.len() - 1]);
            let fraction = if self.log_y {
                (y.max(low).log10() - low.log10()) / (high.log10() - low.log10())
            } else {
                (y - low) / (high - low)
            };
            TOP + plot_h * (1.0 - fraction)
        };

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="24" font-size="15" font-weight="bold" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            escape(&self.title)
        );
        // Grid and tick labels.
        for &tick in &x_ticks {
            let x = x_at(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#e3e3e3"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 18.0,
                short_number(tick)
            );
        }
        for &tick in &y_ticks {
            let y = y_at(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + plot_w,
                LEFT - 8.0,
                y + 4.0,
                short_number(tick)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#777"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 14.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + plot_h / 2.0,
            escape(&self.y_label)
        );
        // Lines, broken where a point is missing, and their markers with the value as a tooltip.
        for series in &self.series {
            let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
            for run in series.points.split(|(_, y)| y.is_none()) {
                let points: Vec<String> = run
                    .iter()
                    .filter_map(|(x, y)| Some(format!("{:.1},{:.1}", x_at(*x), y_at((*y)?))))
                    .collect();
                if points.len() > 1 {
                    let _ = writeln!(
                        svg,
                        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                        points.join(" "),
                        series.color
                    );
                }
            }
            for (x, y) in &series.points {
                let Some(y) = y else { continue };
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{} at {}: {}</title></circle>"#,
                    x_at(*x),
                    y_at(*y),
                    series.color,
                    escape(&series.name),
                    short_number(*x),
                    short_number(*y)
                );
            }
        }
        // Legend.
        for (i, series) in self.series.iter().enumerate() {
            let y = TOP + 10.0 + i as f64 * 20.0;
            let x = LEFT + plot_w + 16.0;
            let dash = if series.dashed { r#" stroke-dasharray="6 4""# } else { "" };
            let _ = writeln!(
                svg,
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
                x + 24.0,
                series.color,
                x + 30.0,
                y + 4.0,
                escape(&series.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_numbers_read_like_axis_labels() {
        assert_eq!(short_number(1.0), "1");
        assert_eq!(short_number(30_000.0), "30k");
        assert_eq!(short_number(1_500_000.0), "1.5M");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(0.0), "0");
    }

    #[test]
    fn ticks_cover_the_values() {
        assert_eq!(log_ticks(1.0, 100_000.0), [1.0, 10.0, 100.0, 1e3, 1e4, 1e5]);
        let linear = linear_ticks(12_345.0);
        assert_eq!(linear[0], 0.0);
        assert!(*linear.last().unwrap() >= 12_345.0 && linear.len() <= 7, "{linear:?}");
    }

    #[test]
    fn a_missing_point_breaks_the_line_and_gets_no_marker() {
        let chart = Chart {
            title: "t".into(),
            x_label: "N".into(),
            y_label: "y".into(),
            log_y: false,
            series: vec![Series {
                name: "a & b".into(),
                color: "#123456",
                dashed: false,
                points: vec![
                    (1.0, Some(1.0)),
                    (10.0, Some(2.0)),
                    (100.0, None),
                    (1000.0, Some(3.0)),
                ],
            }],
        };
        let svg = chart.to_svg();
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("a &amp; b"));
    }
}
