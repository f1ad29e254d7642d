//! Reproducible Gaussian noise: an image's noise is a pure function of its seed, independent of the batch it
//! runs in and of the device.
//!
//! Definition (stable across releases — changing it changes every image):
//! - the stream is SplitMix64 seeded with the image's 64-bit seed: `state += 0x9E3779B97F4A7C15`, output
//!   `mix64(state)` (see `fresco_core::seed::mix64`);
//! - each pair of outputs `(a, b)` gives two standard normals by Box–Muller: `u1 = ((a >> 11) + 1) / 2^53`
//!   (in (0, 1]), `u2 = (b >> 11) / 2^53`, `r = sqrt(-2 ln u1)`, values `r cos(2π u2)` then `r sin(2π u2)`,
//!   computed in f64 and rounded to f32;
//! - the initial latent `[C, H, W]` is filled in row-major order from the start of the stream, and
//!   stochastic schedulers (Euler-ancestral, LCM) keep drawing from the same stream, step after step.

use candle_core::{Device, Tensor};
use fresco_core::seed::mix64;

#[derive(Debug, Clone)]
pub struct NoiseRng {
    state: u64,
    spare: Option<f32>,
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed, spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    pub fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let scale = 1.0 / (1u64 << 53) as f64;
        let u1 = ((self.next_u64() >> 11) + 1) as f64 * scale;
        let u2 = (self.next_u64() >> 11) as f64 * scale;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    pub fn fill(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.normal()).collect()
    }
}

/// One noise stream per image of a batch.
#[derive(Debug, Clone)]
pub struct NoiseStreams {
    streams: Vec<NoiseRng>,
}

impl NoiseStreams {
    pub fn new(seeds: &[u64]) -> Self {
        Self { streams: seeds.iter().map(|s| NoiseRng::new(*s)).collect() }
    }

    /// A `[B, ...]` tensor whose row `i` continues image `i`'s stream. When the leading dimension is a
    /// multiple of the batch (e.g. packed layouts), rows are split evenly.
    pub fn next(&mut self, dims: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        let b = self.streams.len();
        let total: usize = dims.iter().product();
        if b == 0 || !total.is_multiple_of(b) {
            return Err(candle_core::Error::Msg(format!("noise shape {dims:?} does not split over {b} images")));
        }
        let per = total / b;
        let data: Vec<f32> = self.streams.iter_mut().flat_map(|s| s.fill(per)).collect();
        Tensor::from_vec(data, dims, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_a_function_of_the_seed_alone() {
        let a = NoiseRng::new(7).fill(1000);
        let b = NoiseRng::new(7).fill(1000);
        assert_eq!(a, b);
        assert_ne!(a, NoiseRng::new(8).fill(1000));
        // Image 1 of a batch gets the same noise as when run alone.
        let batch = NoiseStreams::new(&[3, 7]).next(&[2, 4, 5, 5], &Device::Cpu).unwrap();
        let alone = NoiseStreams::new(&[7]).next(&[1, 4, 5, 5], &Device::Cpu).unwrap();
        let row: Vec<f32> = batch.get(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(row, alone.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn noise_is_standard_normal() {
        let v = NoiseRng::new(1).fill(200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
        let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
