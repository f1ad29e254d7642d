//! The discrete-time noise schedule shared by the diffusion schedulers (betas → cumulative alphas), and
//! the timestep spacings of diffusers' `set_timesteps`.

use candle_core::Tensor;

use crate::error::{PipelineError, Result};
use crate::loader::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn parse(config: &Config, default: &str) -> Result<Self> {
        match config.str_or("prediction_type", default)? {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(PipelineError::config(&config.path, format!("prediction_type {other:?} is not supported"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub fn parse(config: &Config, default: &str) -> Result<Self> {
        match config.str_or("timestep_spacing", default)? {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(PipelineError::config(&config.path, format!("timestep_spacing {other:?} is not supported"))),
        }
    }
}

/// Class defaults a scheduler starts from before the config file's keys apply.
pub struct Defaults {
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
}

pub const DIFFUSERS_DEFAULTS: Defaults = Defaults { beta_start: 0.0001, beta_end: 0.02, beta_schedule: "linear" };

pub struct NoiseSchedule {
    pub train_steps: usize,
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn from_config(config: &Config, defaults: &Defaults) -> Result<Self> {
        let n = config.usize_or("num_train_timesteps", 1000)?;
        if n < 2 {
            return Err(PipelineError::config(&config.path, "num_train_timesteps must be at least 2"));
        }
        let start = config.f64_or("beta_start", defaults.beta_start)?;
        let end = config.f64_or("beta_end", defaults.beta_end)?;
        let linspace = |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1) as f64);
        let betas: Vec<f64> = if let Some(trained) = config.raw("trained_betas") {
            let v: Option<Vec<f64>> = trained.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
            match v {
                Some(v) if v.len() == n => v,
                _ => return Err(PipelineError::config(&config.path, "trained_betas must list num_train_timesteps numbers")),
            }
        } else {
            match config.str_or("beta_schedule", defaults.beta_schedule)? {
                "linear" => linspace(start, end).collect(),
                "scaled_linear" => linspace(start.sqrt(), end.sqrt()).map(|b| ((b as f32) * (b as f32)) as f64).collect(),
                "squaredcos_cap_v2" => {
                    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                        })
                        .collect()
                }
                other => return Err(PipelineError::config(&config.path, format!("beta_schedule {other:?} is not supported"))),
            }
        };
        // diffusers keeps betas and their cumulative product in float32 (torch.linspace / torch.cumprod);
        // over 1000 steps the rounding is visible in DDIM's x0 estimate, so follow it exactly.
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0f32;
        for b in &betas {
            acc *= 1.0 - *b as f32;
            alphas_cumprod.push(acc as f64);
        }
        if config.bool_or("rescale_betas_zero_snr", false)? {
            rescale_zero_terminal_snr(&mut alphas_cumprod);
        }
        Ok(Self { train_steps: n, alphas_cumprod })
    }

    /// sqrt((1 - ᾱ) / ᾱ) for every training timestep, ascending in t.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
    }

    /// Integer timesteps for the diffusion schedulers (DDIM, PNDM, LCM-free spacings), descending.
    pub fn spaced_timesteps(&self, spacing: Spacing, steps: usize, offset: usize) -> Vec<f64> {
        let n = self.train_steps;
        match spacing {
            Spacing::Linspace => {
                (0..steps).map(|i| if steps == 1 { 0.0 } else { (i as f64 * (n - 1) as f64 / (steps - 1) as f64).round() }).rev().collect()
            }
            Spacing::Leading => {
                let ratio = n / steps;
                (0..steps).map(|i| (i * ratio + offset) as f64).rev().collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                let mut out = Vec::new();
                let mut t = n as f64;
                while t > 0.0 {
                    out.push(t.round() - 1.0);
                    t -= ratio;
                }
                out
            }
        }
    }

    /// `√ᾱ·clean + √(1 − ᾱ)·noise` at timestep `t`.
    pub fn add_noise(&self, clean: &Tensor, noise: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        let a = self.alpha(t as i64, 1.0);
        super::axpby(a.sqrt(), clean, (1.0 - a).sqrt(), noise)
    }

    pub fn alpha(&self, t: i64, final_alpha: f64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.train_steps - 1)]
        } else {
            final_alpha
        }
    }
}

/// Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1.
fn rescale_zero_terminal_snr(alphas_cumprod: &mut [f64]) {
    let sqrt: Vec<f64> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scaled: Vec<f64> = sqrt.iter().map(|s| (s - last) * first / (first - last)).collect();
    let mut alphas: Vec<f64> = scaled.iter().map(|s| s * s).collect();
    // Back to per-step alphas, then cumulative again: keeps the product structure diffusers produces.
    let mut per_step = vec![alphas[0]];
    for i in 1..alphas.len() {
        per_step.push(alphas[i] / alphas[i - 1]);
    }
    let mut acc = 1.0;
    for (i, a) in per_step.iter().enumerate() {
        acc *= a;
        alphas[i] = acc;
    }
    alphas_cumprod.copy_from_slice(&alphas);
}

/// Karras et al. 2022 sigma ramp (rho = 7) between `sigma_max` and `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    (0..steps)
        .map(|i| {
            let ramp = if steps == 1 { 0.0 } else { i as f64 / (steps - 1) as f64 };
            (max_inv + ramp * (min_inv - max_inv)).powf(rho)
        })
        .collect()
}

/// The config key of the noise window of fresco's ancestral samplers: steps that start below this σ (the
/// scheduler's own noise level) draw no fresh noise and take the deterministic step instead, as Karras et
/// al. 2022's `S_tmin` confines their sampler's churn. Late steps only refine detail, and noise drawn
/// there is left for the last few steps to clean up. The leading underscore keeps diffusers, which has
/// no such setting, from reading it (nor [`ANCESTRAL_ETA`]).
pub const ANCESTRAL_SIGMA_MIN: &str = "_fresco_ancestral_sigma_min";
/// The config key of how fast fresco's ancestral samplers forget the sample's own noise: a step from σ to
/// σ_next keeps the share (σ_next / σ)^η of it and draws the rest afresh. η = 1 (the default) is Euler
/// ancestral and η = 0 the deterministic sampler. k-diffusion's `eta` scales one step's fresh noise
/// instead, so the same value draws more at fewer steps and at η > 1 a short schedule keeps none of the
/// sample at all; with a power the share kept between two levels is the same however many steps lie
/// between them.
pub const ANCESTRAL_ETA: &str = "_fresco_ancestral_eta";

/// How an ancestral sampler renoises: how much, and down to which level.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AncestralNoise {
    eta: f64,
    sigma_min: f64,
}

impl AncestralNoise {
    /// [`ANCESTRAL_ETA`] and [`ANCESTRAL_SIGMA_MIN`] from `config`: Euler ancestral's noise on every step
    /// where they are absent.
    pub fn from_config(config: &Config) -> Result<Self> {
        Ok(Self { eta: config.non_negative_f64_or(ANCESTRAL_ETA, 1.0)?, sigma_min: config.non_negative_f64_or(ANCESTRAL_SIGMA_MIN, 0.0)? })
    }

    /// Whether a step from level `sigma` draws noise.
    pub fn draws_at(&self, sigma: f64) -> bool {
        sigma >= self.sigma_min
    }

    /// The split of a step from noise level `sigma` to `next`, as shares of `next`: r^η of the sample's
    /// own noise is kept, with r = next / sigma, and √(1 − r^2η) drawn afresh, so the noise stays of unit
    /// variance. At η = 1 this is k-diffusion's `get_ancestral_step` (σ_down = next·r). An infinite `sigma`
    /// (a flow's pure-noise start in variance-exploding form) keeps none.
    pub fn shares(&self, sigma: f64, next: f64) -> (f64, f64) {
        let r = next / sigma;
        // At η = 1 the kept share is r itself; written so, it is exact.
        let kept = if self.eta == 1.0 { r } else { r.powf(self.eta) };
        (kept, (1.0 - kept * kept).max(0.0).sqrt())
    }
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose sigma is `sigma`, interpolating in
/// log-sigma.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_ge = log_sigmas.iter().rposition(|ls| log_sigma - ls >= 0.0).unwrap_or(0);
    let low_idx = last_ge.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Piecewise-linear interpolation of `values` (sampled at 0, 1, 2, …) at `x`, as `np.interp`.
pub fn interp(x: f64, values: &[f64]) -> f64 {
    if x <= 0.0 {
        return values[0];
    }
    let last = values.len() - 1;
    if x >= last as f64 {
        return values[last];
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    values[i] * (1.0 - f) + values[i + 1] * f
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn cfg(v: serde_json::Value) -> Config {
        Config::from_value(Path::new("scheduler_config.json"), v)
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        let s = NoiseSchedule::from_config(&cfg(json!({})), &DIFFUSERS_DEFAULTS).unwrap();
        assert_eq!(s.spaced_timesteps(Spacing::Leading, 10, 1), vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
        assert_eq!(s.spaced_timesteps(Spacing::Trailing, 4, 0), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(s.spaced_timesteps(Spacing::Linspace, 3, 0), vec![999.0, 500.0, 0.0]);
    }

    #[test]
    fn scaled_linear_cumprod_matches_known_values() {
        let s = NoiseSchedule::from_config(
            &cfg(json!({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})),
            &DIFFUSERS_DEFAULTS,
        )
        .unwrap();
        // Values from diffusers (float64) for SD's schedule.
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-7);
        assert!((s.alphas_cumprod[999] - 0.0046600).abs() < 1e-6, "{}", s.alphas_cumprod[999]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let s = NoiseSchedule::from_config(&cfg(json!({"rescale_betas_zero_snr": true})), &DIFFUSERS_DEFAULTS).unwrap();
        assert!(s.alphas_cumprod[999].abs() < 1e-12);
    }

    /// Each step's noise stays of unit variance whatever η; at η = 1 the kept share is r = next / σ
    /// exactly, at η = 0 all of it. Two steps keep what one step over both levels keeps, so the noise a
    /// schedule keeps does not depend on its step count.
    #[test]
    fn ancestral_shares_keep_unit_variance_and_compose_across_steps() {
        let at = |eta: f64| AncestralNoise { eta, sigma_min: 0.0 };
        for (sigma, next) in [(14.6, 9.9), (2.0, 1.7), (0.5, 0.1), (f64::INFINITY, 3.0), (1.0, 0.0)] {
            let r = next / sigma;
            assert_eq!(at(1.0).shares(sigma, next), (r, (1.0 - r * r).sqrt()), "{sigma} -> {next}");
            assert_eq!(at(0.0).shares(sigma, next).0, 1.0);
            for eta in [0.5, 1.5, 4.0] {
                let (kept, fresh) = at(eta).shares(sigma, next);
                assert!((kept * kept + fresh * fresh - 1.0).abs() < 1e-12, "eta {eta}, {sigma} -> {next}: {kept}, {fresh}");
            }
        }
        for eta in [0.5, 1.0, 1.5, 4.0] {
            let one = at(eta).shares(9.0, 2.0).0;
            let two = at(eta).shares(9.0, 5.0).0 * at(eta).shares(5.0, 2.0).0;
            assert!((one - two).abs() < 1e-12, "eta {eta}: {one} in one step, {two} in two");
            assert!(eta <= 1.0 || one < 2.0 / 9.0, "eta {eta} keeps less than Euler ancestral: {one}");
        }
    }

    #[test]
    fn sigma_to_t_inverts_the_schedule() {
        let s = NoiseSchedule::from_config(&cfg(json!({})), &DIFFUSERS_DEFAULTS).unwrap();
        let logs: Vec<f64> = s.sigmas().iter().map(|x| x.ln()).collect();
        let t = sigma_to_t(s.sigmas()[500], &logs);
        assert!((t - 500.0).abs() < 1e-6);
    }
}
