//! Euler and Euler-ancestral (Karras et al. 2022, k-diffusion) over the discrete SD noise schedule.

use candle_core::Tensor;

use super::schedule::{interp, karras_sigmas, sigma_to_t, AncestralNoise, NoiseSchedule, Prediction, Spacing, DIFFUSERS_DEFAULTS};
use super::{axpby, Scheduler};
use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

pub struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_sigma: f64,
    prediction: Prediction,
    /// Euler ancestral's noise; `None` for plain Euler.
    ancestral: Option<AncestralNoise>,
}

impl Euler {
    pub fn new(config: &Config, steps: usize, ancestral: bool) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, &DIFFUSERS_DEFAULTS)?;
        let spacing = Spacing::parse(config, "linspace")?;
        let offset = config.usize_or("steps_offset", 0)?;
        for key in ["use_exponential_sigmas", "use_beta_sigmas"] {
            if config.bool_or(key, false)? {
                return Err(PipelineError::config(&config.path, format!("{key} is not supported")));
            }
        }
        if config.str_or("interpolation_type", "linear")? != "linear" {
            return Err(PipelineError::config(&config.path, "only interpolation_type \"linear\" is supported"));
        }
        let mut timesteps = schedule.spaced_timesteps(spacing, steps, offset);
        let all = schedule.sigmas();
        let log_sigmas: Vec<f64> = all.iter().map(|s| s.ln()).collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|t| interp(*t, &all)).collect();
        // Euler-ancestral has no Karras option in diffusers; from_config drops the key.
        let karras = !ancestral && config.bool_or("use_karras_sigmas", false)?;
        if karras {
            let min = config.opt_f64("sigma_min")?.unwrap_or(sigmas[sigmas.len() - 1]);
            let max = config.opt_f64("sigma_max")?.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(min, max, steps);
            timesteps = sigmas.iter().map(|s| sigma_to_t(*s, &log_sigmas)).collect();
        }
        let prediction = Prediction::parse(config, "epsilon")?;
        if !ancestral && config.str_or("timestep_type", "discrete")? == "continuous" && prediction == Prediction::VPrediction {
            timesteps = sigmas.iter().map(|s| 0.25 * s.ln()).collect();
        }
        let final_sigma = match (ancestral, config.str_or("final_sigmas_type", "zero")?) {
            (true, _) | (false, "zero") => 0.0,
            (false, "sigma_min") => all[0],
            (false, other) => return Err(PipelineError::config(&config.path, format!("final_sigmas_type {other:?} is not supported"))),
        };
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        sigmas.push(final_sigma);
        let ancestral = if ancestral { Some(AncestralNoise::from_config(config)?) } else { None };
        Ok(Self { timesteps, sigmas, init_sigma, prediction, ancestral })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// In σ-space the sample is the clean latent plus σ times the noise.
    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        axpby(1.0, clean, self.sigmas[step], noise)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_sigma
    }

    fn scale_model_input(&self, sample: Tensor, step: usize) -> candle_core::Result<Tensor> {
        let s = self.sigmas[step];
        sample / (s * s + 1.0).sqrt()
    }

    fn step(&mut self, out: &Tensor, step: usize, sample: &Tensor, noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[step];
        let next = self.sigmas[step + 1];
        let x0 = match self.prediction {
            Prediction::Epsilon => axpby(1.0, sample, -sigma, out)?,
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                axpby(-sigma / s2.sqrt(), out, 1.0 / s2, sample)?
            }
            Prediction::Sample => out.clone(),
        };
        // derivative = (sample - x0) / sigma; x_next = sample + derivative * dt
        let Some(ancestral) = self.ancestral.filter(|a| a.draws_at(sigma)) else {
            let dt = next - sigma;
            return axpby(1.0 + dt / sigma, sample, -dt / sigma, &x0);
        };
        let (kept, fresh) = ancestral.shares(sigma, next);
        let (sigma_down, sigma_up) = (next * kept, next * fresh);
        let dt = sigma_down - sigma;
        let prev = axpby(1.0 + dt / sigma, sample, -dt / sigma, &x0)?;
        let z = noise.next(sample.shape().dims(), sample.device())?.to_dtype(sample.dtype())?;
        prev + (z * sigma_up)?
    }
}
