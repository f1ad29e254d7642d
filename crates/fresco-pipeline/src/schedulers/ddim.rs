//! DDIM (Song et al. 2020) with eta = 0, the deterministic sampler diffusers' pipelines run by default.

use candle_core::Tensor;

use super::schedule::{NoiseSchedule, Prediction, Spacing, DIFFUSERS_DEFAULTS};
use super::{axpby, Scheduler};
use crate::error::Result;
use crate::loader::Config;
use crate::noise::NoiseStreams;

pub struct Ddim {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    step_ratio: i64,
    final_alpha: f64,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

/// x0 and ε from a model output under the given parameterisation.
pub(super) fn split_prediction(p: Prediction, out: &Tensor, sample: &Tensor, alpha: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let beta = 1.0 - alpha;
    let (sa, sb) = (alpha.sqrt(), beta.sqrt());
    Ok(match p {
        Prediction::Epsilon => (axpby(1.0 / sa, sample, -sb / sa, out)?, out.clone()),
        Prediction::VPrediction => (axpby(sa, sample, -sb, out)?, axpby(sa, out, sb, sample)?),
        Prediction::Sample => (out.clone(), axpby(1.0 / sb, sample, -sa / sb, out)?),
    })
}

impl Ddim {
    pub fn new(config: &Config, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, &DIFFUSERS_DEFAULTS)?;
        let spacing = Spacing::parse(config, "leading")?;
        let offset = config.usize_or("steps_offset", 0)?;
        let timesteps = schedule.spaced_timesteps(spacing, steps, offset);
        let final_alpha = if config.bool_or("set_alpha_to_one", true)? { 1.0 } else { schedule.alphas_cumprod[0] };
        let clip_sample = if config.bool_or("clip_sample", true)? { Some(config.f64_or("clip_sample_range", 1.0)?) } else { None };
        if config.bool_or("thresholding", false)? {
            return Err(crate::error::PipelineError::config(&config.path, "dynamic thresholding is not supported"));
        }
        Ok(Self {
            step_ratio: (schedule.train_steps / steps) as i64,
            schedule,
            timesteps,
            final_alpha,
            prediction: Prediction::parse(config, "epsilon")?,
            clip_sample,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, step: usize, sample: &Tensor, _noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        let t = self.timesteps[step] as i64;
        let a_t = self.schedule.alpha(t, self.final_alpha);
        let a_prev = self.schedule.alpha(t - self.step_ratio, self.final_alpha);
        let (mut x0, eps) = split_prediction(self.prediction, out, sample, a_t)?;
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        axpby(a_prev.sqrt(), &x0, (1.0 - a_prev).sqrt(), &eps)
    }
}
