//! Flow-matching Euler (`FlowMatchEulerDiscreteScheduler`) for SD3 and FLUX: a deterministic ODE from noise
//! (sigma = 1) to data (sigma = 0), with a static shift (SD3) or a resolution-dependent one (FLUX dev). Two
//! stochastic forms re-noise each step's clean estimate: diffusers' `stochastic_sampling`, with fresh noise
//! alone, and fresco's `flow-euler-ancestral`, Euler ancestral carried over to the flow's straight line.

use candle_core::Tensor;

use super::schedule::AncestralNoise;
use super::{axpby, Scheduler};
use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

/// What a flow pipeline passes to `set_timesteps`: explicit sigmas (FLUX passes linspace(1, 1/n, n)) and
/// the `mu` of dynamic shifting computed from the image's token count.
#[derive(Debug, Clone, Default)]
pub struct FlowShift {
    pub sigmas: Option<Vec<f64>>,
    pub mu: Option<f64>,
}

/// diffusers' `calculate_shift`: `mu` grows linearly with the image's token count, from `base_shift` at
/// `base_image_seq_len` tokens to `max_shift` at `max_image_seq_len` (and beyond, extrapolated).
pub fn dynamic_shift_mu(config: &Config, tokens: usize) -> Result<f64> {
    let (base_len, max_len) = (config.f64_or("base_image_seq_len", 256.0)?, config.f64_or("max_image_seq_len", 4096.0)?);
    let (base_shift, max_shift) = (config.f64_or("base_shift", 0.5)?, config.f64_or("max_shift", 1.15)?);
    if max_len <= base_len {
        return Err(PipelineError::config(&config.path, "max_image_seq_len must exceed base_image_seq_len"));
    }
    let m = (max_shift - base_shift) / (max_len - base_len);
    Ok(tokens as f64 * m + base_shift - m * base_len)
}

/// SD3's static timestep shift, σ ↦ sσ / (1 + (s − 1)σ): keeps 0 and 1 and, for s > 1, moves the levels
/// between toward noise; s = 1 leaves every level exactly as it is.
pub fn static_shift(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// What a step does besides following the velocity.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Renoise {
    /// The ODE: none.
    No,
    /// diffusers' `stochastic_sampling`: the clean estimate on the next level's line with fresh noise alone.
    Fresh,
    /// fresco's `flow-euler-ancestral`: Euler ancestral's share of the sample's own noise kept (the ODE
    /// on steps below its noise floor).
    Ancestral(AncestralNoise),
}

pub struct FlowEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    renoise: Renoise,
}

impl FlowEuler {
    pub fn new(config: &Config, steps: usize, shift: Option<&FlowShift>, ancestral: bool) -> Result<Self> {
        let n = config.usize_or("num_train_timesteps", 1000)? as f64;
        let s = config.f64_or("shift", 1.0)?;
        let dynamic = config.bool_or("use_dynamic_shifting", false)?;
        for key in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"] {
            if config.bool_or(key, false)? {
                return Err(PipelineError::config(&config.path, format!("{key} is not supported")));
            }
        }
        if config.raw("shift_terminal").is_some() {
            return Err(PipelineError::config(&config.path, "shift_terminal is not supported"));
        }
        let sigmas: Vec<f64> = match shift.and_then(|f| f.sigmas.clone()) {
            Some(v) => v,
            None => {
                // As diffusers: the training sigmas are shifted once at construction (unless dynamic), and
                // the inference ramp between their ends is shifted again below.
                let train = |t: f64| if dynamic { t / n } else { static_shift(t / n, s) };
                let (hi, lo) = (train(n) * n, train(1.0) * n);
                (0..steps).map(|i| if steps == 1 { hi / n } else { (hi + (lo - hi) * i as f64 / (steps - 1) as f64) / n }).collect()
            }
        };
        let sigmas: Vec<f64> = if dynamic {
            let mu = shift
                .and_then(|f| f.mu)
                .ok_or_else(|| PipelineError::config(&config.path, "use_dynamic_shifting needs the pipeline's mu"))?;
            match config.str_or("time_shift_type", "exponential")? {
                "exponential" => sigmas.iter().map(|t| mu.exp() / (mu.exp() + (1.0 / t - 1.0))).collect(),
                "linear" => sigmas.iter().map(|t| mu / (mu + (1.0 / t - 1.0))).collect(),
                other => return Err(PipelineError::config(&config.path, format!("time_shift_type {other:?} is not supported"))),
            }
        } else {
            sigmas.iter().map(|&x| static_shift(x, s)).collect()
        };
        let timesteps = sigmas.iter().map(|x| x * n).collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        // Asked for by name, the ancestral form takes precedence over the config's flag.
        let renoise = match (ancestral, config.bool_or("stochastic_sampling", false)?) {
            (true, _) => Renoise::Ancestral(AncestralNoise::from_config(config)?),
            (false, true) => Renoise::Fresh,
            (false, false) => Renoise::No,
        };
        Ok(Self { timesteps, sigmas, renoise })
    }
}

impl Scheduler for FlowEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The straight line from data to noise: `(1 − σ)·clean + σ·noise`.
    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[step];
        axpby(1.0 - sigma, clean, sigma, noise)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, step: usize, sample: &Tensor, noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
        let renoise = match self.renoise {
            Renoise::Ancestral(a) if !a.draws_at(sigma) => Renoise::No,
            r => r,
        };
        if renoise == Renoise::No {
            return axpby(1.0, sample, next - sigma, out);
        }
        // The velocity points from data to noise, so the clean estimate is σ of it back from the sample;
        // that estimate is put on the line again at the next level.
        let x0 = axpby(1.0, sample, -sigma, out)?;
        let z = noise.next(sample.shape().dims(), sample.device())?.to_dtype(sample.dtype())?;
        let Renoise::Ancestral(ancestral) = renoise else {
            // diffusers' stochastic_sampling: fresh noise alone.
            return axpby(1.0 - next, &x0, next, &z);
        };
        // Divided by 1 − σ the line is the variance-exploding form x0 + s·ε with s = σ / (1 − σ), where
        // Euler ancestral splits each step. s is infinite at σ = 1, where the sample is all noise and none
        // of it is kept, and 0 at the data, where nothing is drawn.
        let ve = |x: f64| x / (1.0 - x);
        let (kept, fresh) = ancestral.shares(ve(sigma), ve(next));
        let eps = axpby(1.0, sample, 1.0 - sigma, out)?;
        let renoised = axpby(kept, &eps, fresh, &z)?;
        axpby(1.0 - next, &x0, next, &renoised)
    }
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use std::path::Path;

    #[test]
    fn a_static_shift_keeps_the_ends_and_moves_the_middle_toward_noise() {
        let levels: Vec<f64> = (0..=100).map(|i| f64::from(i) / 100.0).collect();
        // Bit for bit: a model trained or sampled with shift 1 is the unshifted one.
        assert!(levels.iter().all(|&x| static_shift(x, 1.0).to_bits() == x.to_bits()));
        for s in [0.5, 2.0, 3.0] {
            assert_eq!((static_shift(0.0, s), static_shift(1.0, s)), (0.0, 1.0));
            let shifted: Vec<f64> = levels.iter().map(|&x| static_shift(x, s)).collect();
            assert!(shifted.windows(2).all(|w| w[0] < w[1]), "shift {s} keeps the order");
            assert_eq!(shifted[50] > 0.5, s > 1.0, "shift {s} at 0.5: {}", shifted[50]);
        }
        assert!((static_shift(0.5, 2.0) - 2.0 / 3.0).abs() < 1e-15);
    }

    /// With a perfect velocity the stochastic step lands on the next level's line through the true clean
    /// latent, with the noise stream's next draw as its noise; the last step returns the clean latent.
    #[test]
    fn stochastic_sampling_renoises_the_clean_estimate() {
        let config = Config::from_value(Path::new("scheduler_config.json"), serde_json::json!({"stochastic_sampling": true}));
        let mut s = FlowEuler::new(&config, 4, None, false).unwrap();
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::arange(0f32, 8.0, &dev).unwrap().reshape((1, 2, 2, 2)).unwrap();
        let eps = NoiseStreams::new(&[1]).next(&[1, 2, 2, 2], &dev).unwrap();
        let v = (&eps - &x0).unwrap();
        let mut noise = NoiseStreams::new(&[9]);
        let mut expected_noise = NoiseStreams::new(&[9]);
        for step in 0..4 {
            let (sigma, next) = (s.sigmas[step], s.sigmas[step + 1]);
            let sample = axpby(1.0 - sigma, &x0, sigma, &eps).unwrap();
            let got = s.step(&v, step, &sample, &mut noise).unwrap();
            let z = expected_noise.next(&[1, 2, 2, 2], &dev).unwrap();
            let want = axpby(1.0 - next, &x0, next, &z).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-5, "step {step}, sigma {sigma} -> {next}");
        }
        assert_eq!(s.sigmas[4], 0.0, "the last step ends on the data");
        // Off (the default), the same step is the deterministic Euler update, which draws no noise.
        let mut ode = FlowEuler::new(&Config::from_value(Path::new("s.json"), serde_json::json!({})), 4, None, false).unwrap();
        let sample = axpby(1.0 - ode.sigmas[0], &x0, ode.sigmas[0], &eps).unwrap();
        let got = ode.step(&v, 0, &sample, &mut noise).unwrap();
        let want = axpby(1.0 - ode.sigmas[1], &x0, ode.sigmas[1], &eps).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    /// Euler ancestral on the flow's line: with a perfect velocity each step lands on the next level's
    /// line through the true clean latent, with unit-variance noise of which the share s_next / s
    /// (s = σ / (1 − σ)) is the noise the sample carried; none from σ = 1, where the sample is all noise.
    #[test]
    fn the_ancestral_step_keeps_its_share_of_the_noise_and_stays_on_the_line() {
        let mut s = FlowEuler::new(&Config::from_value(Path::new("s.json"), serde_json::json!({})), 4, None, true).unwrap();
        let dev = candle_core::Device::Cpu;
        let dims = [1, 4, 100, 100];
        let x0 = NoiseStreams::new(&[1]).next(&dims, &dev).unwrap();
        let mut noise = NoiseStreams::new(&[3]);
        let stats = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect::<Vec<_>>();
        for step in 0..4 {
            let (sigma, next) = (s.sigmas[step], s.sigmas[step + 1]);
            let eps = NoiseStreams::new(&[10 + step as u64]).next(&dims, &dev).unwrap();
            let sample = axpby(1.0 - sigma, &x0, sigma, &eps).unwrap();
            let got = s.step(&(&eps - &x0).unwrap(), step, &sample, &mut noise).unwrap();
            if next == 0.0 {
                let err = max_abs_diff(&got, &x0);
                assert!(err < 1e-5, "the last step ends on the clean latent: {err}");
                continue;
            }
            let n = stats(&(axpby(1.0, &got, -(1.0 - next), &x0).unwrap() / next).unwrap());
            let e = stats(&eps);
            let len = n.len() as f64;
            let mean = n.iter().sum::<f64>() / len;
            let var = n.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len;
            let kept = n.iter().zip(&e).map(|(a, b)| a * b).sum::<f64>() / len;
            let want = if sigma >= 1.0 { 0.0 } else { (next / (1.0 - next)) / (sigma / (1.0 - sigma)) };
            assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "step {step}: noise mean {mean}, variance {var}");
            assert!((kept - want).abs() < 0.02, "step {step} ({sigma} -> {next}): kept {kept} of the noise, want {want}");
        }
    }

    /// FLUX.1-dev's published scheduler config; expected values from diffusers 0.42.1 (`calculate_shift`,
    /// then `set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)`), float32 there.
    #[test]
    fn dynamic_shifting_matches_diffusers() {
        let config = Config::from_value(
            Path::new("scheduler_config.json"),
            serde_json::json!({"shift": 3.0, "use_dynamic_shifting": true, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}),
        );
        let cases: [(usize, usize, f64, &[f64]); 2] = [
            (4096, 4, 1.15, &[1.0, 0.904_530_76, 0.759_510_93, 0.512_844_15, 0.0]),
            (1024, 6, 0.63, &[1.0, 0.903_735_58, 0.789_704_80, 0.652_489_42, 0.484_218_42, 0.273_003_31, 0.0]),
        ];
        for (tokens, steps, mu, expected) in cases {
            let got_mu = dynamic_shift_mu(&config, tokens).unwrap();
            assert!((got_mu - mu).abs() < 1e-12, "{tokens} tokens: mu {got_mu}");
            let ramp = (0..steps).map(|i| 1.0 - i as f64 * (1.0 - 1.0 / steps as f64) / (steps - 1) as f64).collect();
            let s = FlowEuler::new(&config, steps, Some(&FlowShift { sigmas: Some(ramp), mu: Some(got_mu) }), false).unwrap();
            assert_eq!(s.sigmas.len(), expected.len());
            for (a, b) in s.sigmas.iter().zip(expected) {
                assert!((a - b).abs() < 1e-6, "{tokens} tokens, {steps} steps: {:?} vs {expected:?}", s.sigmas);
            }
        }
    }
}
