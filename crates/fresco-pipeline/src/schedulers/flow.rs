//! Flow-matching Euler (`FlowMatchEulerDiscreteScheduler`) for SD3 and FLUX: a deterministic ODE from noise
//! (sigma = 1) to data (sigma = 0), with a static shift (SD3) or a resolution-dependent one (FLUX dev).

use candle_core::Tensor;

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

pub struct FlowEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl FlowEuler {
    pub fn new(config: &Config, steps: usize, shift: Option<&FlowShift>) -> Result<Self> {
        let n = config.usize_or("num_train_timesteps", 1000)? as f64;
        let s = config.f64_or("shift", 1.0)?;
        let dynamic = config.bool_or("use_dynamic_shifting", false)?;
        for key in ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"] {
            if config.bool_or(key, false)? {
                return Err(PipelineError::config(&config.path, format!("{key} is not supported")));
            }
        }
        if config.raw("shift_terminal").is_some() {
            return Err(PipelineError::config(&config.path, "shift_terminal is not supported"));
        }
        let static_shift = |x: f64| s * x / (1.0 + (s - 1.0) * x);
        let sigmas: Vec<f64> = match shift.and_then(|f| f.sigmas.clone()) {
            Some(v) => v,
            None => {
                // As diffusers: the training sigmas are shifted once at construction (unless dynamic), and
                // the inference ramp between their ends is shifted again below.
                let train = |t: f64| if dynamic { t / n } else { static_shift(t / n) };
                let (hi, lo) = (train(n) * n, train(1.0) * n);
                (0..steps).map(|i| if steps == 1 { hi / n } else { (hi + (lo - hi) * i as f64 / (steps - 1) as f64) / n }).collect()
            }
        };
        let sigmas: Vec<f64> = if dynamic {
            let mu = shift.and_then(|f| f.mu).ok_or_else(|| PipelineError::config(&config.path, "use_dynamic_shifting needs the pipeline's mu"))?;
            match config.str_or("time_shift_type", "exponential")? {
                "exponential" => sigmas.iter().map(|t| mu.exp() / (mu.exp() + (1.0 / t - 1.0))).collect(),
                "linear" => sigmas.iter().map(|t| mu / (mu + (1.0 / t - 1.0))).collect(),
                other => return Err(PipelineError::config(&config.path, format!("time_shift_type {other:?} is not supported"))),
            }
        } else {
            sigmas.iter().map(|x| static_shift(*x)).collect()
        };
        let timesteps = sigmas.iter().map(|x| x * n).collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }
}

impl Scheduler for FlowEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, step: usize, sample: &Tensor, _noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        axpby(1.0, sample, self.sigmas[step + 1] - self.sigmas[step], out)
    }
}
