//! Figures of repeated runs: each as the median of the repetitions with their spread, and as a
//! ratio to the floor measured in the same run.

use serde::Serialize;

use super::lab::TrafficRun;

/// The median of some repetitions and the smallest and largest of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Of no value at all: zeros.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut values: Vec<f64> = values.into_iter().collect();
        if values.is_empty() {
            return Self::default();
        }
        values.sort_by(f64::total_cmp);
        Self { median: median_of_sorted(&values), min: values[0], max: values[values.len() - 1] }
    }
}

/// The middle value; for an even count the mean of the two middle ones.
fn median_of_sorted(sorted: &[f64]) -> f64 {
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

/// The `fraction` quantile of `samples` (nearest rank), 0 for none.
pub fn quantile(samples: &[f64], fraction: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// What the repetitions of one traffic measurement give: every figure as median and spread.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrafficFigures {
    /// New connections (connect, 1-byte request, 1-byte answer, close) per second.
    pub conn_per_second: Spread,
    pub conn_p50_us: Spread,
    pub conn_p90_us: Spread,
    pub conn_p99_us: Spread,
    pub conn_p999_us: Spread,
    /// Client and server CPU time per new connection, µs (over all repetitions).
    pub conn_cpu_us: f64,
    /// 1-byte requests answered per second on one established connection.
    pub rr_per_second: Spread,
    pub rr_p50_us: Spread,
    pub rr_p99_us: Spread,
    pub rr_p999_us: Spread,
    /// Client and server CPU time per request/response, µs.
    pub rr_cpu_us: f64,
    /// One stream's throughput, Gbit/s.
    pub stream_gbit_per_second: Spread,
}

impl TrafficFigures {
    pub fn of(runs: &[TrafficRun]) -> Self {
        let spread = |f: fn(&TrafficRun) -> f64| Spread::of(runs.iter().map(f));
        let per_operation = |cpu: f64, count: u64| cpu * 1e6 / (count.max(1) as f64);
        Self {
            conn_per_second: spread(|r| r.conn.per_second),
            conn_p50_us: spread(|r| r.conn.p50_us),
            conn_p90_us: spread(|r| r.conn.p90_us),
            conn_p99_us: spread(|r| r.conn.p99_us),
            conn_p999_us: spread(|r| r.conn.p999_us),
            conn_cpu_us: per_operation(
                runs.iter().map(|r| r.conn.cpu_seconds).sum(),
                runs.iter().map(|r| r.conn.count).sum(),
            ),
            rr_per_second: spread(|r| r.rr.per_second),
            rr_p50_us: spread(|r| r.rr.p50_us),
            rr_p99_us: spread(|r| r.rr.p99_us),
            rr_p999_us: spread(|r| r.rr.p999_us),
            rr_cpu_us: per_operation(
                runs.iter().map(|r| r.rr.cpu_seconds).sum(),
                runs.iter().map(|r| r.rr.count).sum(),
            ),
            stream_gbit_per_second: spread(|r| r.stream.gbit_per_second),
        }
    }
}

/// Each figure over the floor's from the same run: above 1 is more (a higher rate, a longer
/// latency, more CPU) than the floor.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratios {
    pub conn_per_second: f64,
    pub conn_p50_us: f64,
    pub conn_p99_us: f64,
    pub conn_cpu_us: f64,
    pub rr_per_second: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    pub stream_gbit_per_second: f64,
}

impl Ratios {
    /// The median over the pairs of each repetition's figure over that of the floor
    /// repetition taken just before it: a burst of load on the shared machine weighs on both
    /// of a pair, and the median leaves out the pairs a burst split.
    pub fn paired(runs: &[TrafficRun], floors: &[TrafficRun]) -> Self {
        let pairs = || runs.iter().zip(floors);
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let median = |f: &dyn Fn(&TrafficRun) -> f64| {
            Spread::of(pairs().map(|(run, floor)| ratio(f(run), f(floor)))).median
        };
        let cpu = |run: &super::worker::RateRun| run.cpu_seconds / (run.count.max(1) as f64);
        Self {
            conn_per_second: median(&|r| r.conn.per_second),
            conn_p50_us: median(&|r| r.conn.p50_us),
            conn_p99_us: median(&|r| r.conn.p99_us),
            conn_cpu_us: median(&|r| cpu(&r.conn)),
            rr_per_second: median(&|r| r.rr.per_second),
            rr_p50_us: median(&|r| r.rr.p50_us),
            rr_p99_us: median(&|r| r.rr.p99_us),
            stream_gbit_per_second: median(&|r| r.stream.gbit_per_second),
        }
    }
}

/// Comma-separated values from rows of (column, value): the header from the first row.
pub fn csv(rows: &[Vec<(String, String)>]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else { return out };
    let header: Vec<&str> = first.iter().map(|(name, _)| name.as_str()).collect();
    out.push_str(&header.join(","));
    out.push('\n');
    for row in rows {
        let values: Vec<&str> = row.iter().map(|(_, value)| value.as_str()).collect();
        out.push_str(&values.join(","));
        out.push('\n');
    }
    out
}

/// The CSV columns of some traffic figures and their ratios, each column name with `prefix`.
pub fn traffic_columns(
    prefix: &str,
    figures: &TrafficFigures,
    ratios: Option<&Ratios>,
) -> Vec<(String, String)> {
    let mut columns = Vec::new();
    let mut spread = |name: &str, spread: &Spread| {
        columns.push((format!("{prefix}{name}"), format!("{:.3}", spread.median)));
        columns.push((format!("{prefix}{name}_min"), format!("{:.3}", spread.min)));
        columns.push((format!("{prefix}{name}_max"), format!("{:.3}", spread.max)));
    };
    spread("conn_per_second", &figures.conn_per_second);
    spread("conn_p50_us", &figures.conn_p50_us);
    spread("conn_p90_us", &figures.conn_p90_us);
    spread("conn_p99_us", &figures.conn_p99_us);
    spread("conn_p999_us", &figures.conn_p999_us);
    spread("rr_per_second", &figures.rr_per_second);
    spread("rr_p50_us", &figures.rr_p50_us);
    spread("rr_p99_us", &figures.rr_p99_us);
    spread("rr_p999_us", &figures.rr_p999_us);
    spread("stream_gbit_per_second", &figures.stream_gbit_per_second);
    columns.push((format!("{prefix}conn_cpu_us"), format!("{:.3}", figures.conn_cpu_us)));
    columns.push((format!("{prefix}rr_cpu_us"), format!("{:.3}", figures.rr_cpu_us)));
    let ratios = ratios.cloned().unwrap_or_default();
    for (name, value) in [
        ("conn_per_second", ratios.conn_per_second),
        ("conn_p50_us", ratios.conn_p50_us),
        ("conn_p99_us", ratios.conn_p99_us),
        ("conn_cpu_us", ratios.conn_cpu_us),
        ("rr_per_second", ratios.rr_per_second),
        ("rr_p50_us", ratios.rr_p50_us),
        ("rr_p99_us", ratios.rr_p99_us),
        ("stream_gbit_per_second", ratios.stream_gbit_per_second),
    ] {
        columns.push((format!("{prefix}ratio_{name}"), format!("{value:.4}")));
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_is_the_median_and_the_extremes_whatever_the_order() {
        assert_eq!(Spread::of([3.0, 1.0, 2.0]), Spread { median: 2.0, min: 1.0, max: 3.0 });
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Spread::of([]), Spread::default());
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&samples, 0.5), 50.0);
        assert_eq!(quantile(&samples, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn csv_rows_keep_the_columns_of_the_first() {
        let row = |a: &str| vec![("a".to_owned(), a.to_owned()), ("b".to_owned(), "x".to_owned())];
        assert_eq!(csv(&[row("1"), row("2")]), "a,b\n1,x\n2,x\n");
    }
}
