//! Shared helpers for fresco's benchmarks (see `src/bin/`).

// The same allocator as the `fresco` binary, so the numbers are the ones a worker sees.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Formats a rate for the printed tables.
pub fn rate(n: f64, secs: f64) -> String {
    format!("{:>10.0}", n / secs.max(1e-9))
}
