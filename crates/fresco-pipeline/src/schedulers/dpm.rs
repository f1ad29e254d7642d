//! DPM-Solver++ (Lu et al. 2022), second-order multistep with the midpoint solver — diffusers'
//! `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`, optionally on Karras sigmas.

use candle_core::Tensor;

use super::schedule::{interp, karras_sigmas, sigma_to_t, NoiseSchedule, Prediction, Spacing, DIFFUSERS_DEFAULTS};
use super::{axpby, Scheduler};
use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

pub struct DpmSolverPp2m {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    prediction: Prediction,
    lower_order_final: bool,
    final_zero: bool,
    previous: Option<Tensor>,
    lower_order_nums: usize,
}

/// (alpha_t, sigma_t) of the variance-preserving process at Karras sigma `s`.
fn alpha_sigma(s: f64) -> (f64, f64) {
    let a = 1.0 / (s * s + 1.0).sqrt();
    (a, s * a)
}

impl DpmSolverPp2m {
    pub fn new(config: &Config, steps: usize, karras: bool) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, &DIFFUSERS_DEFAULTS)?;
        let n = schedule.train_steps;
        for key in ["use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding", "euler_at_final"] {
            if config.bool_or(key, false)? {
                return Err(PipelineError::config(&config.path, format!("{key} is not supported")));
            }
        }
        // One algorithm and order are implemented; a config asking for another (an SDE variant, the
        // noise-prediction form, a third order) is refused rather than sampled with this one.
        // lambda_min_clipped stays at diffusers' default (-inf), so the last usable timestep is the last
        // training step.
        let algorithm = config.str_or("algorithm_type", "dpmsolver++")?;
        if algorithm != "dpmsolver++" {
            return Err(PipelineError::config(
                &config.path,
                format!("algorithm_type {algorithm:?} is not supported (only \"dpmsolver++\")"),
            ));
        }
        let order = config.usize_or("solver_order", 2)?;
        if order != 2 {
            return Err(PipelineError::config(&config.path, format!("solver_order {order} is not supported (only 2)")));
        }
        let spacing = Spacing::parse(config, "linspace")?;
        let offset = config.usize_or("steps_offset", 0)?;
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => (0..=steps).map(|i| (i as f64 * (n - 1) as f64 / steps as f64).round()).rev().take(steps).collect(),
            Spacing::Leading => {
                let ratio = n / (steps + 1);
                (0..=steps).map(|i| (i * ratio) as f64).rev().take(steps).map(|t| t + offset as f64).collect()
            }
            Spacing::Trailing => schedule.spaced_timesteps(Spacing::Trailing, steps, 0),
        };
        let all = schedule.sigmas();
        let log_sigmas: Vec<f64> = all.iter().map(|s| s.ln()).collect();
        let karras = karras || config.bool_or("use_karras_sigmas", false)?;
        let mut sigmas: Vec<f64> = if karras {
            let min = config.opt_f64("sigma_min")?.unwrap_or(all[0]);
            let max = config.opt_f64("sigma_max")?.unwrap_or(all[n - 1]);
            let s = karras_sigmas(min, max, steps);
            timesteps = s.iter().map(|x| sigma_to_t(*x, &log_sigmas).round()).collect();
            s
        } else {
            timesteps.iter().map(|t| interp(*t, &all)).collect()
        };
        let final_zero = match config.str_or("final_sigmas_type", "zero")? {
            "zero" => true,
            "sigma_min" => false,
            other => return Err(PipelineError::config(&config.path, format!("final_sigmas_type {other:?} is not supported"))),
        };
        sigmas.push(if final_zero { 0.0 } else { all[0] });
        // diffusers stores sigmas as float32.
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::parse(config, "epsilon")?,
            lower_order_final: config.bool_or("lower_order_final", true)?,
            final_zero,
            previous: None,
            lower_order_nums: 0,
        })
    }
}

impl Scheduler for DpmSolverPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, clean: &Tensor, noise: &Tensor, step: usize) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[step]);
        axpby(alpha, clean, sigma, noise)
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn step(&mut self, out: &Tensor, i: usize, sample: &Tensor, _noise: &mut NoiseStreams) -> candle_core::Result<Tensor> {
        let steps = self.timesteps.len();
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction {
            Prediction::Epsilon => axpby(1.0 / alpha_s0, sample, -sigma_s0 / alpha_s0, out)?,
            Prediction::VPrediction => axpby(alpha_s0, sample, -sigma_s0, out)?,
            Prediction::Sample => out.clone(),
        };
        let last = i + 1 == steps;
        let lower_final = last && ((self.lower_order_final && steps < 15) || self.final_zero);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let coeff = alpha_t * ((-h).exp() - 1.0);
        // sigma_t / sigma_s0 is 0 at a zero final sigma; keep it finite.
        let ratio = if sigma_t == 0.0 { 0.0 } else { sigma_t / sigma_s0 };
        let result = match (&self.previous, self.lower_order_nums < 1 || lower_final) {
            (Some(prev), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = h0 / h;
                // D1 = (m0 - m1) / r0; x = ratio*sample - coeff*D0 - 0.5*coeff*D1
                let d1 = ((&x0 - prev)? / r0)?;
                ((sample * ratio)? - (&x0 * coeff)?)?.sub(&(d1 * (0.5 * coeff))?)?
            }
            _ => axpby(ratio, sample, -coeff, &x0)?,
        };
        self.previous = Some(x0);
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A config for another DPM-Solver than the one implemented is refused by its key, not sampled with
    /// the ODE solver of second order; diffusers' defaults and their explicit spelling load.
    #[test]
    fn other_algorithms_and_orders_are_refused_by_key() {
        let cfg = |v: serde_json::Value| Config::from_value(std::path::Path::new("scheduler_config.json"), v);
        for ok in [json!({}), json!({"algorithm_type": "dpmsolver++", "solver_order": 2})] {
            assert!(DpmSolverPp2m::new(&cfg(ok), 10, false).is_ok());
        }
        for (key, bad) in [("algorithm_type", json!({"algorithm_type": "sde-dpmsolver++"})), ("solver_order", json!({"solver_order": 3}))] {
            let err = DpmSolverPp2m::new(&cfg(bad), 10, true).err().expect("refused").to_string();
            assert!(err.contains(key) && err.contains("scheduler_config.json"), "{err}");
        }
    }
}
