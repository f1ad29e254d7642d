//! Shared helpers for fresco's benchmarks (see `src/bin/`).

/// Formats a rate for the printed tables.
pub fn rate(n: f64, secs: f64) -> String {
    format!("{:>10.0}", n / secs.max(1e-9))
}
