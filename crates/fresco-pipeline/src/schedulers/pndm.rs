//! PNDM (Liu et al. 2022): Runge–Kutta warm-up steps (unless `skip_prk_steps`) followed by linear
//! multistep (PLMS) updates — SD 1.x's published default. Note the denoiser runs steps+1 times with
//! `skip_prk_steps`, exactly as in diffusers.

use candle_core::Tensor;

use super::schedule::{NoiseSchedule, Prediction, Spacing, DIFFUSERS_DEFAULTS};
use super::{axpby, Scheduler};
use crate::error::{PipelineError, Result};
use crate::loader::Config;
use crate::noise::NoiseStreams;

pub struct Pndm {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    prk_count: usize,
    step_ratio: i64,
    final_alpha: f64,
    prediction: Prediction,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    pub fn new(config: &Config, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, &DIFFUSERS_DEFAULTS)?;
        let n = schedule.train_steps;
        let spacing = Spacing::parse(config, "leading")?;
        let offset = config.usize_or("steps_offset", 0)?;
        // Ascending base timesteps as diffusers' `_timesteps`.
        let base: Vec<i64> = match spacing {
            Spacing::Leading => (0..steps).map(|i| (i * (n / steps) + offset) as i64).collect(),
            Spacing::Linspace => {
                (0..steps).map(|i| if steps == 1 { 0 } else { (i as f64 * (n - 1) as f64 / (steps - 1) as f64).round() as i64 }).collect()
            }
            Spacing::Trailing => {
                let ratio = n as f64 / steps as f64;
                let mut v: Vec<i64> = (0..steps).map(|i| (n as f64 - i as f64 * ratio).round() as i64 - 1).collect();
                v.reverse();
                v
            }
        };
        let skip_prk = config.bool_or("skip_prk_steps", false)?;
        let (timesteps, prk_count): (Vec<i64>, usize) = if skip_prk {
            let k = base.len();
            let mut plms: Vec<i64> = base[..k - 1].to_vec();
            if k >= 2 {
                plms.push(base[k - 2]);
            }
            plms.push(base[k - 1]);
            plms.reverse();
            (plms, 0)
        } else {
            if steps < 4 {
                return Err(PipelineError::param("steps", "PNDM with Runge-Kutta warm-up needs at least 4 steps"));
            }
            let order = 4;
            let half = (n / steps / 2) as i64;
            let tail = &base[base.len() - order..];
            let mut prk: Vec<i64> = tail.iter().flat_map(|t| [*t, *t + half]).collect();
            // prk[:-1].repeat(2)[1:-1][::-1]
            prk.pop();
            let repeated: Vec<i64> = prk.iter().flat_map(|t| [*t, *t]).collect();
            let mut prk: Vec<i64> = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = base[..base.len() - 3].to_vec();
            plms.reverse();
            let count = prk.len();
            (prk.into_iter().chain(plms).collect(), count)
        };
        let final_alpha = if config.bool_or("set_alpha_to_one", false)? { 1.0 } else { schedule.alphas_cumprod[0] };
        Ok(Self {
            step_ratio: (n / steps) as i64,
            schedule,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            prk_count,
            final_alpha,
            prediction: Prediction::parse(config, "epsilon")?,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, out: &Tensor) -> candle_core::Result<Tensor> {
        let a_t = self.schedule.alpha(t, self.final_alpha);
        let a_prev = self.schedule.alpha(prev_t, self.final_alpha);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let out = match self.prediction {
            Prediction::VPrediction => axpby(a_t.sqrt(), out, b_t.sqrt(), sample)?,
            Prediction::Epsilon => out.clone(),
            Prediction::Sample => return Err(candle_core::Error::Msg("PNDM does not support prediction_type \"sample\"".into())),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        axpby(sample_coeff, sample, -(a_prev - a_t) / denom, &out)
    }

    fn step_prk(&mut self, out: &Tensor, t: i64, sample: &Tensor) -> candle_core::Result<Tensor> {
        let half = self.step_ratio / 2;
        let diff = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = t - diff;
        let t = self.timesteps[self.counter / 4 * 4] as i64;
        let acc = |cur: &Option<Tensor>, w: f64| -> candle_core::Result<Tensor> {
            match cur {
                Some(c) => c + (out * w)?,
                None => out * w,
            }
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 6.0)?);
                self.ets.push(out.clone());
                self.cur_sample = Some(sample.clone());
                out.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 3.0)?);
                out.clone()
            }
            _ => {
                let m = acc(&self.cur_model_output, 1.0 / 6.0)?;
                self.cur_model_output = None;
                m
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        self.prev_sample(&cur, t, prev_t, &model_output)
    }

    fn step_plms(&mut self, out: &Tensor, t: i64, sample: &Tensor) -> candle_core::Result<Tensor> {
        let (mut t, mut prev_t) = (t, t - self.step_ratio);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(out.clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let model_output = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            out.clone()
        } else if k == 1 && self.counter == 1 {
            if let Some(s) = self.cur_sample.take() {
                sample = s;
            }
            ((out + &e[0])? / 2.0)?
        } else if k == 2 {
            axpby(1.5, &e[1], -0.5, &e[0])?
        } else if k == 3 {
            ((axpby(23.0, &e[2], -16.0, &e[1])? + (&e[0] * 5.0)?)? / 12.0)?
        } else {
            let a = axpby(55.0, &e[k - 1], -59.0, &e[k - 2])?;
            let b = axpby(37.0, &e[k - 3], -9.0, &e[k - 4])?;
            ((a + b)? / 24.0)?
        };
        self.prev_sample(&sample, t, prev_t, &model_output)
    }
}

impl Scheduler for Pndm {
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
        let r = if self.counter < self.prk_count { self.step_prk(out, t, sample) } else { self.step_plms(out, t, sample) };
        self.counter += 1;
        r
    }
}
