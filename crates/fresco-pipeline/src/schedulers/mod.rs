//! Noise schedulers, each built from `scheduler/scheduler_config.json` the way diffusers' `from_config`
//! builds it: the file's keys over the class's own defaults. Scalar schedule arithmetic runs in f64 on the
//! host; only the update itself touches tensors.

mod ddim;
mod dpm;
mod euler;
mod flow;
mod lcm;
mod pndm;
mod schedule;

use candle_core::Tensor;

use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

pub use flow::{dynamic_shift_mu, static_shift, FlowShift};
pub use schedule::{Prediction, ANCESTRAL_ETA, ANCESTRAL_SIGMA_MIN};

/// One denoising schedule for one generation: the timesteps to evaluate the denoiser at, and the update
/// that turns its output into the next latents.
pub trait Scheduler: Send {
    /// Denoiser evaluation points, in order (the value passed to the model).
    fn timesteps(&self) -> &[f64];
    /// Factor applied to standard-normal noise to start sampling.
    fn init_noise_sigma(&self) -> f64;
    /// Input scaling before the denoiser (Euler-type schedulers divide by sqrt(sigma^2 + 1)).
    fn scale_model_input(&self, sample: Tensor, _step: usize) -> candle_core::Result<Tensor> {
        Ok(sample)
    }
    /// `clean` latents noised by `noise` to the level the schedule starts step `step` from (diffusers'
    /// `add_noise` at `timesteps[step]`): where image-to-image enters the schedule.
    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor>;
    /// Advances `sample` by one step given the (guided) model output at step `step`.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: &mut NoiseStreams) -> candle_core::Result<Tensor>;
}

/// The scheduler names fresco accepts and the diffusers classes they correspond to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
    Lcm,
    FlowEuler,
    /// Flow-matching Euler with ancestral noise: fresco's own, named only by `--scheduler` or a model's
    /// `_fresco_defaults` (no diffusers class samples a flow this way).
    FlowEulerAncestral,
}

impl SchedulerKind {
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "ddim" => Self::Ddim,
            "pndm" => Self::Pndm,
            "euler" => Self::Euler,
            "euler-ancestral" => Self::EulerAncestral,
            "dpmpp-2m" => Self::DpmPp2m,
            "dpmpp-2m-karras" => Self::DpmPp2mKarras,
            "lcm" => Self::Lcm,
            "flow-euler" => Self::FlowEuler,
            "flow-euler-ancestral" => Self::FlowEulerAncestral,
            other => return Err(PipelineError::param("scheduler", format!("unknown scheduler {other:?}"))),
        })
    }

    pub fn from_class(class: &str, path: &std::path::Path) -> Result<Self> {
        Ok(match class {
            "DDIMScheduler" => Self::Ddim,
            "PNDMScheduler" => Self::Pndm,
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DPMSolverMultistepScheduler" => Self::DpmPp2m,
            "LCMScheduler" => Self::Lcm,
            "FlowMatchEulerDiscreteScheduler" => Self::FlowEuler,
            other => return Err(PipelineError::config(path, format!("scheduler class {other:?} is not supported"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-ancestral",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mKarras => "dpmpp-2m-karras",
            Self::Lcm => "lcm",
            Self::FlowEuler => "flow-euler",
            Self::FlowEulerAncestral => "flow-euler-ancestral",
        }
    }

    pub fn is_flow(self) -> bool {
        matches!(self, Self::FlowEuler | Self::FlowEulerAncestral)
    }

    /// Builds the schedule for `steps` evaluations. `flow_shift` carries the pipeline's resolution-dependent
    /// shift for flow-matching models (FLUX) and its explicit sigmas.
    pub fn build(self, config: &Config, steps: usize, flow_shift: Option<&FlowShift>) -> Result<Box<dyn Scheduler>> {
        if steps == 0 {
            return Err(PipelineError::param("steps", "must be at least 1"));
        }
        Ok(match self {
            Self::Ddim => Box::new(ddim::Ddim::new(config, steps)?),
            Self::Pndm => Box::new(pndm::Pndm::new(config, steps)?),
            Self::Euler => Box::new(euler::Euler::new(config, steps, false)?),
            Self::EulerAncestral => Box::new(euler::Euler::new(config, steps, true)?),
            Self::DpmPp2m => Box::new(dpm::DpmSolverPp2m::new(config, steps, false)?),
            Self::DpmPp2mKarras => Box::new(dpm::DpmSolverPp2m::new(config, steps, true)?),
            Self::Lcm => Box::new(lcm::Lcm::new(config, steps)?),
            Self::FlowEuler => Box::new(flow::FlowEuler::new(config, steps, flow_shift, false)?),
            Self::FlowEulerAncestral => Box::new(flow::FlowEuler::new(config, steps, flow_shift, true)?),
        })
    }
}

/// `a * x + b * y` on tensors of one shape.
pub(crate) fn axpby(a: f64, x: &Tensor, b: f64, y: &Tensor) -> candle_core::Result<Tensor> {
    (x * a)? + (y * b)?
}

/// The largest elementwise difference of two f32 tensors of one shape (the schedulers' tests).
#[cfg(test)]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use serde_json::json;

    /// Image-to-image enters a schedule where `add_noise` says; a denoiser that knows the noise exactly
    /// then walks back to the clean latents. A level off by a step, or the wrong parameterisation, ends
    /// elsewhere.
    #[test]
    fn an_exact_denoiser_takes_noised_latents_back_to_the_clean_ones() {
        let dev = Device::Cpu;
        let clean = Tensor::new(&[[0.8f32, -1.5], [0.3, 2.0]], &dev).unwrap();
        let noise = Tensor::new(&[[-0.4f32, 1.1], [0.9, -2.2]], &dev).unwrap();
        // Without clipping, and ending at ᾱ = 1, DDIM's last step lands on its x0 exactly.
        let config =
            Config::from_value(std::path::Path::new("scheduler_config.json"), json!({"set_alpha_to_one": true, "clip_sample": false}));
        for kind in [SchedulerKind::Ddim, SchedulerKind::Euler, SchedulerKind::DpmPp2m, SchedulerKind::FlowEuler] {
            for start in [0, 3, 9] {
                let mut s = kind.build(&config, 10, None).unwrap();
                let mut sample = s.add_noise(&clean, &noise, start).unwrap();
                // ε for the diffusion schedulers (epsilon prediction), the velocity noise − data for flow.
                let out = if kind.is_flow() { (&noise - &clean).unwrap() } else { noise.clone() };
                let mut streams = NoiseStreams::new(&[0]);
                for i in start..s.timesteps().len() {
                    sample = s.step(&out, i, &sample, &mut streams).unwrap();
                }
                let err = max_abs_diff(&sample, &clean);
                assert!(err < 1e-4, "{} from step {start}: {err} from the clean latents", kind.name());
            }
        }
    }

    /// Under `_fresco_ancestral_sigma_min` the ancestral samplers take their deterministic twin's step
    /// from every level below the floor, and their own noisy step above it: a run of differing steps,
    /// then a run of equal ones. Without the key every step but the last draws noise, and at
    /// `_fresco_ancestral_eta` 0 none does. A value that is not a non-negative number is refused by name.
    #[test]
    fn ancestral_samplers_draw_noise_only_above_their_floor() {
        let dev = Device::Cpu;
        let sample = Tensor::new(&[[0.8f32, -1.5], [0.3, 2.0]], &dev).unwrap();
        let out = Tensor::new(&[[-0.4f32, 1.1], [0.9, -2.2]], &dev).unwrap();
        let cfg = |v: serde_json::Value| Config::from_value(std::path::Path::new("scheduler_config.json"), v);
        // Mid-schedule floors: σ 1 of diffusers' default betas, and flow σ 0.45 (levels 1, 0.9, …, 0.1).
        for (kind, plain, floor) in [
            (SchedulerKind::EulerAncestral, SchedulerKind::Euler, 1.0),
            (SchedulerKind::FlowEulerAncestral, SchedulerKind::FlowEuler, 0.45),
        ] {
            let equal_steps = |config: &Config| {
                let (mut a, mut b) = (kind.build(config, 10, None).unwrap(), plain.build(config, 10, None).unwrap());
                let mut streams = NoiseStreams::new(&[0]);
                (0..10)
                    .map(|i| {
                        let (x, y) = (a.step(&out, i, &sample, &mut streams).unwrap(), b.step(&out, i, &sample, &mut streams).unwrap());
                        max_abs_diff(&x, &y) < 1e-5
                    })
                    .collect::<Vec<bool>>()
            };
            let everywhere = equal_steps(&cfg(json!({})));
            assert_eq!(
                everywhere.iter().filter(|e| **e).count(),
                1,
                "{}: only the step to the data draws nothing: {everywhere:?}",
                kind.name()
            );
            assert!(equal_steps(&cfg(json!({ ANCESTRAL_ETA: 0.0 }))).iter().all(|e| *e), "{}: eta 0", kind.name());
            let floored = equal_steps(&cfg(json!({ ANCESTRAL_SIGMA_MIN: floor })));
            let first_equal = floored.iter().position(|e| *e).unwrap();
            assert!(first_equal > 0 && first_equal < 9, "{}: {floored:?}", kind.name());
            assert!(
                floored[first_equal..].iter().all(|e| *e) && !floored[..first_equal].iter().any(|e| *e),
                "{}: {floored:?}",
                kind.name()
            );
            for (key, bad) in [(ANCESTRAL_SIGMA_MIN, json!(-1.0)), (ANCESTRAL_SIGMA_MIN, json!("high")), (ANCESTRAL_ETA, json!(-0.5))] {
                let err = kind.build(&cfg(json!({ key: bad })), 10, None).err().unwrap().to_string();
                assert!(err.contains(key) && err.contains("scheduler_config.json"), "{err}");
            }
        }
    }
}
