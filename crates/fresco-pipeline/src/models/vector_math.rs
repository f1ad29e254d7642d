//! Element-wise math for the CPU kernels, written branch-free so that loops over slices vectorise, and a
//! way to run such loops on the CPU's widest vector units.
//!
//! libm's `expf` and `erff` are scalar calls with branches; in a softmax over 4,096 scores a query or a
//! GELU over SD's feed-forward activations they took a tenth of a U-Net evaluation.

/// Runs `f` compiled for the widest vector units the CPU has: AVX-512, else AVX2 (with FMA, so that
/// `mul_add` is one instruction, not a libm call), else the build's baseline. Only code inlined into
/// the trampolines below profits, so the closure must be marked
/// `#[inline(always)]` (it has three call sites, and a large one is otherwise called, not inlined),
/// its helpers too, and its loops plain `for` loops over slices (an iterator chain ending in
/// `collect()` or `fold` goes through library functions that stay out of line and run on SSE).
#[inline(always)]
pub fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { with_avx512(f) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { with_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `exp(x)` for `x ≤ 0` to within two units in the last place: Cephes' `expf` (x = n·ln 2 + r,
/// |r| ≤ ln 2 / 2, a degree-6 polynomial in r, times 2ⁿ built in the exponent bits). Below −87 it
/// returns e⁻⁸⁷ (≈ 10⁻³⁸): nothing beside a softmax row's maximum, whose term is 1.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    // 1.5 · 2²³: adding it rounds to an integer with plain arithmetic, which then sits in the low
    // mantissa bits of the sum.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 in two parts, so that n·ln 2 is subtracted without rounding error.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ: the low mantissa bits of `shifted + 127` hold n + 127 (1..=127 here), and shifting them
    // into the exponent field builds the power without a float-to-integer conversion, which would
    // keep the loop from vectorising (and in debug builds an integer addition's overflow check too).
    e * f32::from_bits((shifted + 127.0).to_bits() << 23)
}

/// The exact (erf) GELU, `x · Φ(x)`, to within 2·10⁻⁷·|x|: erf by Abramowitz and Stegun's 7.1.26
/// (absolute error below 1.5·10⁻⁷).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    x * normal_cdf(x).0
}

/// [`gelu_erf`] and its slope `Φ(x) + x·φ(x)`, from one evaluation of `Φ` (a backward pass needs both).
#[inline(always)]
pub fn gelu_erf_and_slope(x: f32) -> (f32, f32) {
    // 1/√(2π): φ(x) = e^(−x²/2)/√(2π).
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let (phi, gauss) = normal_cdf(x);
    (x * phi, phi + x * gauss * FRAC_1_SQRT_2PI)
}

/// `Φ(x)`, the standard normal distribution function, and `e^(−x²/2)`, which it computes on the way.
#[inline(always)]
fn normal_cdf(x: f32) -> (f32, f32) {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    // erf(|x|/√2) = 1 − poly·e^(−z²); Φ(x) = (1 + erf(x/√2)) / 2, mirrored for negative x.
    let gauss = exp_nonpositive(-z * z);
    let tail = 0.5 * poly * gauss;
    (if x < 0.0 { tail } else { 1.0 - tail }, gauss)
}

/// The logistic function `1 / (1 + e^−z)`, branch-free: the exponential is only ever taken of
/// `−|z|`, and the two halves of the curve are selected, not branched to.
#[inline(always)]
pub fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    let r = 1.0 / (1.0 + e);
    if z >= 0.0 {
        r
    } else {
        e * r
    }
}

/// SiLU, `x · σ(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// The tanh-approximate GELU, `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`, written as
/// `x · σ(2u)` (the same function: `1 + tanh(u) = 2σ(2u)`), so no `tanhf` call.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    x * sigmoid(gelu_tanh_arg(x).0)
}

/// The tanh GELU's logistic argument `k(x) = 2·√(2/π)·(x + 0.044715 x³)` and its slope `k′(x)`: the
/// forward pass takes the first, a backward pass both.
#[inline(always)]
pub fn gelu_tanh_arg(x: f32) -> (f32, f32) {
    // 2·√(2/π), the scale of `tanh`'s argument as a logistic function's.
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769_2;
    const CUBIC: f32 = 0.044_715;
    (TWO_SQRT_2_OVER_PI * (x + CUBIC * x * x * x), TWO_SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x))
}

/// The scale of CLIP's quick GELU, `x · σ(1.702 x)`.
pub const QUICK_GELU_SCALE: f32 = 1.702;

/// CLIP's quick GELU, `x · σ(1.702 x)`.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    x * sigmoid(QUICK_GELU_SCALE * x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_nonpositive(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) >= 0.0);
    }

    /// Against candle's erf GELU, the one this replaces, over the range activations take and beyond.
    #[test]
    fn gelu_matches_candles() {
        let xs: Vec<f32> = (-300_000..=300_000).map(|i| i as f32 / 10_000.0).collect();
        let want = candle_core::Tensor::new(xs.as_slice(), &candle_core::Device::Cpu)
            .and_then(|t| t.gelu_erf())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle's gelu_erf");
        let worst = xs.iter().zip(&want).map(|(&x, &w)| (gelu_erf(x) - w).abs() / x.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst < 5e-7, "worst error {worst:e} (relative to max(|x|, 1))");
        assert_eq!(gelu_erf(0.0), 0.0);
        assert!(gelu_erf(-100.0).abs() < 1e-30);
        assert_eq!(gelu_erf(100.0), 100.0);
    }

    /// The slope against a central difference of the exact GELU in f64, and its limits far out.
    #[test]
    fn gelu_slope_matches_the_exact_derivative() {
        // erf by its Maclaurin series, exact in f64 for |x| ≤ 3 (the terms stay small, so no cancellation).
        let erf = |x: f64| {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-18 {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let exact = |x: f64| x * 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
        let worst = (-40_000..=40_000)
            .map(|i| i as f32 / 10_000.0)
            .map(|x| {
                let h = 1e-5;
                let want = (exact(x as f64 + h) - exact(x as f64 - h)) / (2.0 * h);
                ((gelu_erf_and_slope(x).1 as f64) - want).abs()
            })
            .fold(0f64, f64::max);
        assert!(worst < 1e-6, "worst error {worst:e}");
        assert_eq!(gelu_erf_and_slope(50.0).1, 1.0);
        assert!(gelu_erf_and_slope(-50.0).1.abs() < 1e-30);
    }

    /// Against the exact functions in f64, over the range activations take and beyond.
    #[test]
    fn gates_match_the_exact_functions() {
        fn sigmoid64(z: f64) -> f64 {
            1.0 / (1.0 + (-z).exp())
        }
        let exact_silu = |x: f64| x * sigmoid64(x);
        let exact_gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        let exact_quick = |x: f64| x * sigmoid64(1.702 * x);
        let cases = [
            ("silu", silu as fn(f32) -> f32, exact_silu as fn(f64) -> f64),
            ("gelu_tanh", gelu_tanh, exact_gelu),
            ("quick_gelu", quick_gelu, exact_quick),
        ];
        for (name, ours, exact) in cases {
            let worst = (-300_000..=300_000)
                .map(|i| i as f32 / 5_000.0)
                .map(|x| ((ours(x) as f64) - exact(x as f64)).abs() / (x.abs() as f64).max(1.0))
                .fold(0f64, f64::max);
            assert!(worst < 3e-7, "{name}: worst error {worst:e} (relative to max(|x|, 1))");
        }
        assert_eq!(sigmoid(0.0), 0.5);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!(sigmoid(-200.0) >= 0.0 && sigmoid(-200.0) < 1e-37);
        assert!(sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn vectorised_runs_the_closure_once() {
        let mut calls = 0;
        let sum: f32 = vectorised(|| {
            calls += 1;
            (0..1000).map(|i| exp_nonpositive(-(i as f32) / 100.0)).sum()
        });
        assert_eq!(calls, 1);
        assert!((sum - (0..1000).map(|i| (-(i as f32) / 100.0).exp()).sum::<f32>()).abs() < 1e-3);
    }
}
