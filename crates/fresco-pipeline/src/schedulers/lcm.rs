//! Latent Consistency Model sampling (Luo et al. 2023): each step predicts the clean latent and re-noises it
//! to the next timestep with fresh noise from the image's own stream.

use candle_core::Tensor;

use super::ddim::split_prediction;
use super::schedule::{Defaults, NoiseSchedule, Prediction};
use super::{axpby, Scheduler};
use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

const LCM_DEFAULTS: Defaults = Defaults { beta_start: 0.00085, beta_end: 0.012, beta_schedule: "scaled_linear" };

pub struct Lcm {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    final_alpha: f64,
    prediction: Prediction,
    timestep_scaling: f64,
    clip_sample: Option<f64>,
}

impl Lcm {
    pub fn new(config: &Config, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, &LCM_DEFAULTS)?;
        let n = schedule.train_steps;
        let original = config.usize_or("original_inference_steps", 50)?;
        if steps > original {
            return Err(PipelineError::param("steps", format!("LCM supports at most original_inference_steps = {original} steps")));
        }
        let k = n / original;
        let origin: Vec<i64> = (1..=original).rev().map(|i| (i * k) as i64 - 1).collect();
        let timesteps = (0..steps).map(|i| origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize] as f64).collect();
        let final_alpha = if config.bool_or("set_alpha_to_one", true)? { 1.0 } else { schedule.alphas_cumprod[0] };
        let clip_sample = if config.bool_or("clip_sample", false)? { Some(config.f64_or("clip_sample_range", 1.0)?) } else { None };
        if config.bool_or("thresholding", false)? {
            return Err(PipelineError::config(&config.path, "dynamic thresholding is not supported"));
        }
        Ok(Self {
            schedule,
            timesteps,
            final_alpha,
            prediction: Prediction::parse(config, "epsilon")?,
            timestep_scaling: config.f64_or("timestep_scaling", 10.0)?,
            clip_sample,
        })
    }
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        self.schedule.add_noise(clean, noise, self.timesteps[step])
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        let t = self.timesteps[i];
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(t);
        let a_t = self.schedule.alpha(t as i64, self.final_alpha);
        let a_prev = self.schedule.alpha(prev_t as i64, self.final_alpha);
        let scaled = t * self.timestep_scaling;
        let sigma_data2 = 0.25;
        let c_skip = sigma_data2 / (scaled * scaled + sigma_data2);
        let c_out = scaled / (scaled * scaled + sigma_data2).sqrt();
        let (mut x0, _) = split_prediction(self.prediction, out, sample, a_t)?;
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        let denoised = axpby(c_out, &x0, c_skip, sample)?;
        if i + 1 == self.timesteps.len() {
            return Ok(denoised);
        }
        let z = noise.next(sample.shape().dims(), sample.device())?.to_dtype(sample.dtype())?;
        axpby(a_prev.sqrt(), &denoised, (1.0 - a_prev).sqrt(), &z)
    }
}
