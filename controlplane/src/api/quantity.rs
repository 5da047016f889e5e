//! Kubernetes resource quantities (`500m`, `1.5`, `128Mi`, `1G`, `2e3`) as numbers.

/// Decimal and binary suffixes with their factors. Longer suffixes first, so `Mi` is not read
/// as `M` followed by garbage, and `E` (exa) is tried after the exponent form has failed.
const SUFFIXES: [(&str, f64); 15] = [
    ("Ki", 1024.0),
    ("Mi", 1_048_576.0),
    ("Gi", 1_073_741_824.0),
    ("Ti", 1_099_511_627_776.0),
    ("Pi", 1_125_899_906_842_624.0),
    ("Ei", 1_152_921_504_606_846_976.0),
    ("n", 1e-9),
    ("u", 1e-6),
    ("m", 1e-3),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

/// The value of a quantity (`500m` → 0.5, `1Gi` → 2^30); `None` when it does not parse or is
/// negative.
pub fn value(text: &str) -> Option<f64> {
    let text = text.trim();
    // A plain number, exponent forms (`2e3`) included.
    let parsed = text.parse::<f64>().ok().or_else(|| {
        SUFFIXES.iter().find_map(|(suffix, factor)| {
            text.strip_suffix(suffix)?.parse::<f64>().ok().map(|n| n * factor)
        })
    })?;
    (parsed.is_finite() && parsed >= 0.0).then_some(parsed)
}

/// The quantity in units of `1 / scale` (1000 for millicores, 1 for bytes), rounded up.
pub fn scaled(text: &str, scale: f64) -> Option<u64> {
    value(text).map(|v| (v * scale).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::{scaled, value};

    #[test]
    fn quantities_parse_as_kubernetes_writes_them() {
        assert_eq!(scaled("100m", 1000.0), Some(100));
        assert_eq!(scaled("1.5", 1000.0), Some(1500));
        assert_eq!(scaled("128Mi", 1.0), Some(128 << 20));
        assert_eq!(scaled("1G", 1.0), Some(1_000_000_000));
        assert_eq!(scaled("2e3", 1.0), Some(2000));
        assert_eq!(scaled("1Ki", 1.0), Some(1024));
        assert_eq!(value("1E"), Some(1e18));
        assert_eq!(value("lots"), None);
        assert_eq!(value("-1"), None);
    }
}
