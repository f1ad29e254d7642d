//! An auxiliary training objective for the denoisers: from the U-Net's mid block, and from its last up
//! block, predict the clean scene's layout — which colour–shape class covers how much of each latent
//! cell, or of finer sub-cells — and from the mid block where each object is centred.
//!
//! Representation alignment (REPA, Yu et al. 2024) trains a diffusion transformer several times faster by
//! asking one of its hidden layers, through a small head dropped afterwards, to match a pretrained image
//! encoder's features of the clean image. Here no such encoder exists, but the renderer knows the exact
//! answer a perfect one would give: where each object is and what it is. The denoising loss weighs a
//! square's missing corners like any other few latent values; the layout's cross-entropy names the
//! square's class at every cell it covers, at every noise level. The heads are not saved: the shipped
//! U-Net is the same diffusers model as before.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use fresco_pipeline::models::blocks::{linear, silu, LayerNorm, Linear};
use fresco_pipeline::models::unet::UNetFeatures;

use crate::error::Result;
use crate::render::{centre_map, layout_map, Placed, LAYOUT_CLASSES};
use crate::rng::Rng;

/// Which of the U-Net's features a head reads.
#[derive(Debug, Clone, Copy)]
pub(super) enum Level {
    /// The mid block: its cells are 2 to the U-Net's levels less one latent cells a side, and each sees
    /// the whole frame through its attention.
    Mid,
    /// The last up block, at the latent's own cells: all the output convolution reads.
    Top,
}

/// What a head predicts of the clean scene, per map cell.
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    /// Which class covers how much of it ([`layout_map`]).
    Coverage,
    /// Which class's object is centred in it ([`centre_map`]).
    Centres,
}

/// One auxiliary loss as the denoiser's training runs it: a head with its own parameters and initial
/// draws, its weight, and each pool scene's target in [`head_order`].
pub(super) struct Auxiliary {
    level: Level,
    target: Target,
    /// Map cells a side per latent cell.
    cells: usize,
    /// Map cells a side per cell of the features the head reads.
    sub: usize,
    weight: f64,
    head: LayoutHead,
    pub vars: VarMap,
    targets: Vec<Tensor>,
}

impl Auxiliary {
    /// `None` at weight 0: no head and no draws, so leaving one out trains exactly what the recipe
    /// trained without it. `widths` are the U-Net's level widths; `seed` is this head's own stream.
    pub fn new(
        level: Level,
        target: Target,
        cells: usize,
        weight: f64,
        widths: &[usize],
        seed: &Rng,
        device: &Device,
    ) -> Result<Option<Self>> {
        if weight == 0.0 {
            return Ok(None);
        }
        let (channels, sub) = match level {
            // Each U-Net level but the last halves the latent grid on the way to the mid block.
            Level::Mid => (widths.last().copied().unwrap_or_default(), (1 << widths.len().saturating_sub(1)) * cells),
            Level::Top => (widths.first().copied().unwrap_or_default(), cells),
        };
        let vars = VarMap::new();
        let head = LayoutHead::new(channels, sub, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        super::init_vars(&vars, seed, |_| false)?;
        Ok(Some(Self { level, target, cells, sub, weight, head, vars, targets: Vec::new() }))
    }

    /// Adds the next pool scene's target, from its shapes and the side of its latent.
    pub fn push(&mut self, shapes: &[Placed], latent_side: usize, device: &Device) -> Result<()> {
        let side = latent_side * self.cells;
        let map = match self.target {
            Target::Coverage => layout_map(shapes, side),
            Target::Centres => centre_map(shapes, side),
        };
        self.targets.push(Tensor::from_vec(head_order(&map, side, self.sub), (side * side, LAYOUT_CLASSES), device)?);
        Ok(())
    }

    /// The weighted loss of the batch of pool scenes `picks`.
    pub fn loss(&self, features: &UNetFeatures, picks: &[usize]) -> Result<Tensor> {
        let at = match self.level {
            Level::Mid => &features.mid,
            Level::Top => &features.top,
        };
        let target = Tensor::stack(&picks.iter().map(|&i| self.targets[i].clone()).collect::<Vec<_>>(), 0)?;
        Ok(self.head.loss(at, &target)?.affine(self.weight, 0.0)?)
    }
}

struct LayoutHead {
    norm: LayerNorm,
    hidden: Linear,
    out: Linear,
}

impl LayoutHead {
    /// A head on features of `channels` whose every cell spans `sub` × `sub` cells of the layout map (on
    /// the mid block, 2 to the U-Net's levels less one, times the map's sub-cells per latent cell).
    fn new(channels: usize, sub: usize, vb: VarBuilder) -> Result<Self> {
        let width = 2 * channels;
        Ok(Self {
            norm: LayerNorm::new(channels, 1e-5, vb.pp("norm"))?,
            hidden: linear(channels, width, vb.pp("hidden"))?,
            out: linear(width, sub * sub * LAYOUT_CLASSES, vb.pp("out"))?,
        })
    }

    /// Cross-entropy of the predicted class distributions against `target`, averaged over cells.
    /// `features` is `[B, C, h, w]`; `target` is `[B, h·w·sub², LAYOUT_CLASSES]` in [`head_order`].
    fn loss(&self, features: &Tensor, target: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = features.dims4()?;
        // Normalised first: the U-Net's next layers normalise these features anyway (a resnet's GroupNorm
        // after the mid block, the output norm after the last up block), so without it nothing stops the
        // head's gradient from inflating them to sharpen its softmax (on the mid block, in a 100-step
        // check, their RMS went from 0.7 to 65 and the cross-entropy from 3.3 to 14).
        let x = self.norm.forward(&features.flatten_from(2)?.transpose(1, 2)?)?;
        let logits = self.out.forward(&silu(&self.hidden.forward(&x)?)?)?.reshape((b, (), LAYOUT_CLASSES))?;
        // candle-nn's log-softmax is composed of differentiable ops (its fused softmax records no backward).
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok((target * log_p)?.sum(D::Minus1)?.mean_all()?.neg()?)
    }
}

/// Reorders a `layout_map` (`side` × `side` cells, row by row) into the order [`LayoutHead`] predicts
/// it: mid-block cell by cell, and within each its `sub` × `sub` map cells.
fn head_order(map: &[f32], side: usize, sub: usize) -> Vec<f32> {
    let coarse = side / sub;
    let mut out = Vec::with_capacity(map.len());
    for i in 0..coarse {
        for j in 0..coarse {
            for a in 0..sub {
                for b in 0..sub {
                    let cell = (sub * i + a) * side + sub * j + b;
                    out.extend_from_slice(&map[cell * LAYOUT_CLASSES..(cell + 1) * LAYOUT_CLASSES]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn head_order_groups_each_mid_cell_with_its_latent_cells() {
        // One class value per cell: its own index, so the order can be read back.
        let side = 4;
        let map: Vec<f32> = (0..side * side).flat_map(|c| std::iter::repeat_n(c as f32, LAYOUT_CLASSES)).collect();
        let ordered: Vec<f32> = head_order(&map, side, 2).chunks(LAYOUT_CLASSES).map(|c| c[0]).collect();
        assert_eq!(ordered, [0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]);
    }

    /// The loss is the cross-entropy it claims: a head whose output layer is zero predicts the uniform
    /// distribution, ln(classes) against any target; and every parameter gets a gradient through it.
    #[test]
    fn the_loss_is_a_cross_entropy_with_gradients() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let head = LayoutHead::new(4, 2, vb).expect("head");
        let mid = Tensor::randn(0f32, 1., (2, 4, 2, 2), &Device::Cpu).expect("mid");
        let cells = 2 * 2 * 2 * 2;
        let mut t = vec![0f32; 2 * cells * LAYOUT_CLASSES];
        for (i, cell) in t.chunks_mut(LAYOUT_CLASSES).enumerate() {
            cell[i % LAYOUT_CLASSES] = 0.25;
            cell[0] += 0.75;
        }
        let target = Tensor::from_vec(t, (2, cells, LAYOUT_CLASSES), &Device::Cpu).expect("target");
        let loss = head.loss(&mid, &target).expect("loss");
        let grads = loss.backward().expect("backward");
        for var in map.all_vars() {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            assert!(g.abs().and_then(|g| g.sum_all()).and_then(|g| g.to_scalar::<f32>()).expect("sum") > 0.0);
        }
        // A small step down the gradient lowers the loss.
        let before = loss.to_scalar::<f32>().expect("scalar");
        for var in map.all_vars() {
            let g = grads.get(var.as_tensor()).expect("a gradient");
            var.set(&(var.as_tensor() - (g * 0.01).expect("step")).expect("sub")).expect("set");
        }
        let after = head.loss(&mid, &target).expect("loss").to_scalar::<f32>().expect("scalar");
        assert!(after < before, "{before} → {after}");
        for (name, var) in map.data().lock().expect("lock").iter() {
            if name.starts_with("out.") {
                var.set(&var.zeros_like().expect("zeros")).expect("zero");
            }
        }
        let uniform = head.loss(&mid, &target).expect("loss").to_scalar::<f32>().expect("scalar");
        assert!((uniform - (LAYOUT_CLASSES as f32).ln()).abs() < 1e-5, "{uniform}");
    }
}
