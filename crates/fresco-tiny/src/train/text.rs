//! The text encoder's own training, before the denoisers'. Stable Diffusion conditions its U-Net on a
//! CLIP text encoder pretrained elsewhere and kept frozen; fresco-tiny has no CLIP of its world, so it
//! pretrains one: from a prompt's tokens, the encoder learns to read what the prompt says — per object
//! phrase its count, size, colour, shape and position, and the background — from the grammar's own
//! parse of it. Text alone, so it takes minutes; the U-Net then learns to draw from conditioning that
//! already means something, instead of from an encoder still learning with it from nothing.

use std::path::Path;

use candle_core::{DType, Tensor};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
use fresco_pipeline::models::blocks::{linear, Linear};
use fresco_pipeline::models::clip::{ClipConfig, ClipTextModel};
use fresco_pipeline::tokenizer::PromptTokenizer;

use super::{adamw, check_gradients, init_vars, save_f16, sorted_vars, write_json, write_tokenizer, CompactVocab, Progress, TrainOptions};
use crate::error::Result;
use crate::grammar::{self, Color, Object, Position, Prompt, Shape, Size};
use crate::rng::Rng;

/// Classes per object: count (0 = no such phrase, then 1–3), size, colour, shape, position (none, then
/// each of the five).
const OBJECT_GROUPS: [usize; 5] = [4, 3, 8, 3, 6];
const OBJECT_LOGITS: usize = 24;
/// No background phrase, then each colour.
const BACKGROUNDS: usize = 9;

/// The classes of one object phrase; `None` where there is nothing to learn (an absent phrase has only
/// its count, zero).
fn object_labels(o: Option<&Object>) -> Vec<Option<usize>> {
    match o {
        None => vec![Some(0), None, None, None, None],
        Some(o) => vec![
            Some(o.count.n()),
            Size::ALL.iter().position(|&s| s == o.size),
            Color::ALL.iter().position(|&c| c == o.color),
            Shape::ALL.iter().position(|&s| s == o.shape),
            Some(o.position.and_then(|p| Position::ALL.iter().position(|&q| q == p)).map_or(0, |i| i + 1)),
        ],
    }
}

/// The whole prompt as the last position reads it: both phrases (the second maybe absent), then the
/// background.
fn scene_labels(p: Option<&Prompt>) -> Vec<Option<usize>> {
    let objects = p.map(|p| p.objects.as_slice()).unwrap_or(&[]);
    let mut labels = object_labels(objects.first());
    labels.extend(object_labels(objects.get(1)));
    labels.push(Some(p.and_then(|p| p.background).and_then(|b| Color::ALL.iter().position(|&c| c == b)).map_or(0, |i| i + 1)));
    labels
}

fn scene_groups() -> Vec<usize> {
    OBJECT_GROUPS.iter().chain(&OBJECT_GROUPS).copied().chain([BACKGROUNDS]).collect()
}

/// A batch of prompts and what each position to be checked should read.
struct Batch {
    ids: Vec<Vec<u32>>,
    /// Flat `b · tokens + position` of each object phrase's last token, with that phrase's classes.
    phrase_ends: Vec<(u32, Vec<Option<usize>>)>,
    /// Per prompt, the classes its last position (padding, which attends to the whole prompt) reads.
    scenes: Vec<Vec<Option<usize>>>,
}

struct Reader<'a> {
    tokenizer: &'a PromptTokenizer,
    vocab: &'a CompactVocab,
    eos: u32,
}

impl Reader<'_> {
    /// Index of the last token of `text` in its encoding (the one before the end-of-text token).
    fn last_token(&self, text: &str) -> Result<usize> {
        let ids = self.tokenizer.encode(text)?;
        Ok(ids.iter().position(|&t| t == self.eos).unwrap_or(ids.len()).saturating_sub(1))
    }

    /// `prompts`, where `None` stands for the empty prompt classifier-free guidance trains with.
    fn batch(&self, prompts: &[Option<Prompt>]) -> Result<Batch> {
        let mut batch = Batch { ids: Vec::new(), phrase_ends: Vec::new(), scenes: Vec::new() };
        for (b, p) in prompts.iter().enumerate() {
            let text = p.as_ref().map(Prompt::text).unwrap_or_default();
            let ids = self.tokenizer.encode(&text)?;
            let row = b * ids.len();
            if let Some(p) = p {
                for k in 0..p.objects.len() {
                    let phrase = Prompt { objects: p.objects[..=k].to_vec(), background: None };
                    let end = self.last_token(&phrase.text())?;
                    batch.phrase_ends.push(((row + end) as u32, object_labels(p.objects.get(k))));
                }
            }
            batch.ids.push(self.vocab.map(&ids));
            batch.scenes.push(scene_labels(p.as_ref()));
        }
        Ok(batch)
    }
}

/// Summed cross-entropy of each group of `logits`' columns against the rows' labels for it; rows
/// without a label in a group are left out of that group.
fn grouped_loss(logits: &Tensor, labels: &[Vec<Option<usize>>], groups: &[usize]) -> Result<Tensor> {
    let device = logits.device();
    let mut total = Tensor::zeros((), DType::F32, device)?;
    let mut offset = 0;
    for (g, &size) in groups.iter().enumerate() {
        let (rows, targets): (Vec<u32>, Vec<u32>) =
            labels.iter().enumerate().filter_map(|(r, l)| l[g].map(|t| (r as u32, t as u32))).unzip();
        if !rows.is_empty() {
            let picked = logits.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?.narrow(1, offset, size)?.contiguous()?;
            total = (total + candle_nn::loss::cross_entropy(&picked, &Tensor::new(targets.as_slice(), device)?)?)?;
        }
        offset += size;
    }
    Ok(total)
}

/// Fraction of rows whose every labelled group's highest logit is the label.
fn all_right(logits: &Tensor, labels: &[Vec<Option<usize>>], groups: &[usize]) -> Result<f64> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let right = rows
        .iter()
        .zip(labels)
        .filter(|(row, label)| {
            let mut offset = 0;
            groups.iter().zip(label.iter()).all(|(&size, want)| {
                let group = &row[offset..offset + size];
                offset += size;
                let best = group.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i);
                want.is_none() || best == *want
            })
        })
        .count();
    Ok(right as f64 / rows.len().max(1) as f64)
}

/// One or two object phrases, half each, never a held-out prompt (as the scenes of the U-Net's pool).
fn random_training_prompt(rng: &mut Rng) -> Prompt {
    let objects = 1 + rng.below(2);
    Prompt::sample_split(rng, objects, false)
}

/// How many prompts the finished encoder is checked on.
const CHECK_PROMPTS: usize = 512;

/// Trains a text encoder of `opts.arch` into the model folder `dir`: its `tokenizer/` (from the CLIP
/// tokenizer folder `tokenizer` the models are built on) and `text_encoder/` (config and weights, full
/// CLIP vocabulary). Returns the fraction of held-out prompts the trained encoder reads completely right.
pub fn train_text_encoder(dir: &Path, tokenizer: &Path, opts: &TrainOptions, progress: Progress) -> Result<f64> {
    opts.validate()?;
    let device = opts.device.device()?;
    write_tokenizer(dir, opts, tokenizer)?;
    let tokenizer = PromptTokenizer::clip(&dir.join("tokenizer"))?;
    let dir = dir.join("text_encoder");
    write_json(&dir.join("config.json"), &opts.arch.text_config())?;
    let full_config = ClipConfig::load(&dir, false)?;
    let mut rows = grammar::words().into_iter().map(|w| tokenizer.encode(w)).collect::<fresco_pipeline::Result<Vec<_>>>()?;
    rows.push(tokenizer.encode("")?);
    let vocab = CompactVocab::new(&rows);
    let eos = tokenizer.eos_id().unwrap_or(full_config.eos_token_id);
    let reader = Reader { tokenizer: &tokenizer, vocab: &vocab, eos };

    let mut config = full_config.clone();
    config.vocab_size = vocab.used.len();
    config.eos_token_id = vocab.index.get(&full_config.eos_token_id).copied().unwrap_or(0);
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
    let text = ClipTextModel::new(config, vb.pp("encoder"))?;
    let hidden = opts.arch.text_hidden;
    let object_head = linear(hidden, OBJECT_LOGITS, vb.pp("object_head"))?;
    let scene_head = linear(hidden, 2 * OBJECT_LOGITS + BACKGROUNDS, vb.pp("scene_head"))?;
    let seed = Rng::new(opts.seed).fork(6);
    init_vars(&map, &seed.fork(0), |_| false)?;
    let groups = scene_groups();
    let heads = Heads { text: &text, object: &object_head, scene: &scene_head };

    let mut data = seed.fork(1);
    let s = opts.text;
    let mut opt = adamw(map.all_vars(), s.lr)?;
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let prompts: Vec<Option<Prompt>> =
            (0..s.batch).map(|_| (!data.chance(opts.uncond_fraction)).then(|| random_training_prompt(&mut data))).collect();
        let batch = reader.batch(&prompts)?;
        let (objects, scenes) = heads.forward(&batch)?;
        let object_labels: Vec<_> = batch.phrase_ends.iter().map(|(_, l)| l.clone()).collect();
        let loss = (grouped_loss(&objects, &object_labels, &OBJECT_GROUPS)? + grouped_loss(&scenes, &batch.scenes, &groups)?)?;
        let grads = loss.backward()?;
        if step == 0 {
            check_gradients(&[&map], &grads)?;
        }
        opt.step(&grads)?;
        progress("text", step + 1, s.steps, loss.to_scalar::<f32>()?);
    }

    let mut check = Rng::new(opts.seed).fork(7);
    let prompts: Vec<Option<Prompt>> = (0..CHECK_PROMPTS).map(|i| Some(Prompt::sample_split(&mut check, 1 + i % 2, true))).collect();
    let batch = reader.batch(&prompts)?;
    let (_, scenes) = heads.forward(&batch)?;
    let read = all_right(&scenes, &batch.scenes, &groups)?;

    let mut tensors = Vec::new();
    for (name, var) in sorted_vars(&map) {
        let Some(name) = name.strip_prefix("encoder.") else { continue };
        let t = var.as_tensor().clone();
        let t = if name.ends_with("token_embedding.weight") { vocab.expand(&t, full_config.vocab_size, &seed.fork(2))? } else { t };
        tensors.push((name.to_string(), t));
    }
    save_f16(tensors, &dir.join("model.safetensors"))?;
    Ok(read)
}

struct Heads<'a> {
    text: &'a ClipTextModel,
    object: &'a Linear,
    scene: &'a Linear,
}

impl Heads<'_> {
    /// Logits of the object head at each phrase end and of the scene head at each last position.
    fn forward(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let states = self.text.forward(&batch.ids)?.last_hidden_state;
        let device = states.device();
        let (b, n, h) = states.dims3()?;
        let flat = states.reshape((b * n, h))?;
        let ends: Vec<u32> = batch.phrase_ends.iter().map(|(at, _)| *at).collect();
        let objects = if ends.is_empty() {
            Tensor::zeros((0, OBJECT_LOGITS), DType::F32, device)?
        } else {
            self.object.forward(&flat.index_select(&Tensor::new(ends.as_slice(), device)?, 0)?)?
        };
        let scenes = self.scene.forward(&states.narrow(1, n - 1, 1)?.squeeze(1)?)?;
        Ok((objects, scenes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::Count;

    fn example() -> Prompt {
        Prompt {
            objects: vec![
                Object { count: Count::Two, size: Size::Large, color: Color::Red, shape: Shape::Circle, position: Some(Position::Left) },
                Object { count: Count::A, size: Size::Default, color: Color::Blue, shape: Shape::Triangle, position: None },
            ],
            background: Some(Color::White),
        }
    }

    #[test]
    fn labels_name_each_phrase_and_the_background() {
        let (s, n) = (Some, None);
        // Two, large, red, circle, on the left; one, default size, blue, triangle, no position; white.
        assert_eq!(scene_labels(Some(&example())), [s(2), s(2), s(0), s(0), s(1), s(1), s(1), s(2), s(2), s(0), s(7)]);
        // The empty prompt: no phrases, the grey background.
        assert_eq!(scene_labels(None), [s(0), n, n, n, n, s(0), n, n, n, n, s(0)]);
        assert_eq!(scene_groups().iter().sum::<usize>(), 2 * OBJECT_LOGITS + BACKGROUNDS);
        assert_eq!(OBJECT_GROUPS.iter().sum::<usize>(), OBJECT_LOGITS);
    }

    #[test]
    fn each_phrase_is_read_at_its_last_word() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-sd15/tokenizer");
        let tokenizer = PromptTokenizer::clip(&dir).expect("tokenizer");
        let rows = grammar::words().into_iter().map(|w| tokenizer.encode(w).expect("encode")).collect::<Vec<_>>();
        let vocab = CompactVocab::new(&rows);
        let reader = Reader { tokenizer: &tokenizer, vocab: &vocab, eos: tokenizer.eos_id().expect("eos") };
        let batch = reader.batch(&[None, Some(example())]).expect("batch");
        let ids = tokenizer.encode(&example().text()).expect("encode");
        let word = |w: &str| tokenizer.encode(w).expect("encode")[1];
        let ends: Vec<usize> = batch.phrase_ends.iter().map(|(at, _)| *at as usize - ids.len()).collect();
        assert_eq!(ends.iter().map(|&i| ids[i]).collect::<Vec<_>>(), [word("left"), word("triangle")]);
        assert_eq!(batch.phrase_ends[1].1, object_labels(example().objects.get(1)));
        assert_eq!(batch.scenes.len(), 2);
        // Every token of the batch is in the compact table.
        assert!(batch.ids.iter().flatten().all(|&t| (t as usize) < vocab.used.len()));
    }
}
