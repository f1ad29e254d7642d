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

/// x0 and ε from a model output under the given parameterisation, by diffusers' float32 operations:
/// √α and √(1 − α) rounded to float32, and `(sample − √(1−α)·ε) / √α` a division, not a multiplication
/// by a reciprocal. At high noise √α is about 0.07, so the rounding of this one expression is scaled
/// by 14 into x0; written as diffusers writes it, fresco's rounding is diffusers' own.
pub(super) fn split_prediction(p: Prediction, out: &Tensor, sample: &Tensor, alpha: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let (sa, sb) = root_coefficients(alpha);
    let divide = |x: Tensor, d: f64| x.broadcast_div(&Tensor::new(d as f32, x.device())?.to_dtype(x.dtype())?);
    Ok(match p {
        Prediction::Epsilon => (divide((sample - (out * sb)?)?, sa)?, out.clone()),
        Prediction::VPrediction => (axpby(sa, sample, -sb, out)?, axpby(sa, out, sb, sample)?),
        Prediction::Sample => (out.clone(), divide((sample - (out * sa)?)?, sb)?),
    })
}

/// `(√α, √(1 − α))` in float32 arithmetic, as diffusers computes them from its float32 `alphas_cumprod`.
fn root_coefficients(alpha: f64) -> (f64, f64) {
    let alpha = alpha as f32;
    (f64::from(alpha.sqrt()), f64::from((1.0 - alpha).sqrt()))
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

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        self.schedule.add_noise(clean, noise, self.timesteps[step])
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
        let (sa_prev, sb_prev) = root_coefficients(a_prev);
        axpby(sa_prev, &x0, sb_prev, &eps)
    }
}
