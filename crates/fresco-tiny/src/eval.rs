//! `fresco eval`: prompt adherence of a model on held-out prompts at several step counts, judged by
//! [`crate::analyze`], with the seconds each image took.

use std::path::Path;
use std::time::Instant;

use fresco_pipeline::{DeviceSpec, GeneratedImage, Pipeline, Request};

use crate::analyze::{check, ProblemKind, Verdict};
use crate::error::Result;
use crate::grammar::{Prompt, Shape, Size};
use crate::render::{sample_scene, Image, SIDE};
use crate::rng::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Held-out prompts of each kind (one object phrase, two object phrases).
    pub prompts: usize,
    pub steps: Vec<usize>,
    pub seed: u64,
    pub batch: usize,
    /// Guidance scale for every run; `None` takes each model's default.
    pub guidance: Option<f64>,
    pub device: DeviceSpec,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { prompts: 100, steps: vec![1, 2, 4, 8, 16, 32], seed: 1, batch: 25, guidance: None, device: DeviceSpec::Cpu }
    }
}

/// One line of the table: a model at one step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub model: String,
    pub steps: usize,
    pub default_steps: bool,
    pub adherence: Adherence,
    pub seconds_per_image: f64,
}

/// How many of a set of images adhere to their prompts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adherence {
    /// Fraction of one-object prompts whose image adheres.
    pub one: f64,
    /// The same split by the prompt's shape, in [`Shape::ALL`]'s order: tells a model that draws one
    /// shape for every word from one that draws all three a little wrong.
    pub one_by_shape: [f64; 3],
    /// The same split by the object's size, in [`Size::ALL`]'s order: small shapes are the ones an 8×8
    /// latent draws worst (models/NOTEBOOK.md).
    pub one_by_size: [f64; 3],
    pub two: f64,
    /// Fraction of adherent images whose objects also have the right size.
    pub sizes: f64,
    /// Images that failed, by the first problem found, in [`ProblemKind::ALL`]'s order: what a recipe
    /// change should aim at.
    pub failures: [usize; ProblemKind::ALL.len()],
}

impl Adherence {
    pub fn of(prompts: &[Prompt], verdicts: &[Verdict]) -> Self {
        let rate =
            |keep: &dyn Fn(&Prompt) -> bool| fraction(prompts.iter().zip(verdicts).filter(|(p, _)| keep(p)).map(|(_, v)| v.adherent));
        Self {
            one: rate(&|p| p.objects.len() == 1),
            one_by_shape: Shape::ALL.map(|s| rate(&|p| p.objects.len() == 1 && p.objects[0].shape == s)),
            one_by_size: Size::ALL.map(|s| rate(&|p| p.objects.len() == 1 && p.objects[0].size == s)),
            two: rate(&|p| p.objects.len() == 2),
            sizes: fraction(verdicts.iter().filter(|v| v.adherent).map(|v| v.sizes_right)),
            failures: ProblemKind::ALL.map(|k| verdicts.iter().filter(|v| v.problem.as_ref().is_some_and(|p| p.kind == k)).count()),
        }
    }
}

/// The fraction of `items` that are true (0 when there are none).
fn fraction(items: impl Iterator<Item = bool>) -> f64 {
    let (hits, n) = items.fold((0usize, 0usize), |(hits, n), b| (hits + usize::from(b), n + 1));
    hits as f64 / n.max(1) as f64
}

/// The held-out prompts an evaluation uses: `n` of each kind, the same for every model.
pub fn held_out(n: usize, seed: u64) -> Vec<Prompt> {
    let mut rng = Rng::new(seed).fork(7);
    let mut out: Vec<Prompt> = (0..n).map(|_| sample_scene(&mut rng, 1, true).0).collect();
    out.extend((0..n).map(|_| sample_scene(&mut rng, 2, true).0));
    out
}

fn to_image(g: &GeneratedImage) -> Image {
    Image { side: g.width as usize, rgb: g.rgb.clone() }
}

/// Runs one model over the held-out prompts at each step count (and at its own default, when that is
/// not among them). Returns the rows and, per step count, the images of the first `keep` prompts.
pub fn evaluate(model: &Path, opts: &EvalOptions, keep: usize) -> Result<(Vec<Row>, Vec<Vec<Image>>)> {
    let pipeline = Pipeline::load(model, &opts.device)?;
    let name = model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prompts = held_out(opts.prompts, opts.seed);
    let default = pipeline.defaults().steps;
    let mut steps = opts.steps.clone();
    if !steps.contains(&default) {
        steps.push(default);
        steps.sort_unstable();
    }
    let mut rows = Vec::new();
    let mut samples = Vec::new();
    for &s in &steps {
        let started = Instant::now();
        let mut images = Vec::with_capacity(prompts.len());
        for (c, chunk) in prompts.chunks(opts.batch.max(1)).enumerate() {
            let seeds = (0..chunk.len()).map(|i| opts.seed.wrapping_mul(1_000_003).wrapping_add((c * opts.batch + i) as u64)).collect();
            let mut req = Request::new(chunk.iter().map(Prompt::text).collect(), seeds);
            req.steps = Some(s);
            req.guidance = opts.guidance;
            req.width = Some(SIDE);
            req.height = Some(SIDE);
            images.extend(pipeline.generate(&req)?.iter().map(to_image));
        }
        let secs = started.elapsed().as_secs_f64() / prompts.len().max(1) as f64;
        let verdicts: Vec<_> = prompts.iter().zip(&images).map(|(p, img)| check(p, img)).collect();
        let adherence = Adherence::of(&prompts, &verdicts);
        rows.push(Row { model: name.clone(), steps: s, default_steps: s == default, adherence, seconds_per_image: secs });
        samples.push(images.into_iter().take(keep).collect());
    }
    Ok((rows, samples))
}

/// The table as printed and as put in notes.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| model | steps | 1 object | (circle / square / triangle) | (small / default / large) | 2 objects | sizes right | s/image |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let steps = if r.default_steps { format!("**{}** (default)", r.steps) } else { r.steps.to_string() };
        let a = &r.adherence;
        s.push_str(&format!(
            "| {} | {} | {:.1}% | {} | {} | {:.1}% | {:.1}% | {:.4} |\n",
            r.model,
            steps,
            100.0 * a.one,
            percents(&a.one_by_shape),
            percents(&a.one_by_size),
            100.0 * a.two,
            100.0 * a.sizes,
            r.seconds_per_image
        ));
    }
    s
}

/// `a / b / c%`, whole percents.
pub fn percents(fractions: &[f64]) -> String {
    let parts: Vec<String> = fractions.iter().map(|f| format!("{:.0}", 100.0 * f)).collect();
    format!("{}%", parts.join(" / "))
}

/// Why the images of each row failed: counts by the first problem found, out of all its prompts.
pub fn failure_table(rows: &[Row], prompts: usize) -> String {
    let kinds = ProblemKind::ALL.map(ProblemKind::word);
    let mut s = format!("| model | steps | {} |\n|---|---:|{}\n", kinds.join(" | "), "---:|".repeat(kinds.len()));
    for r in rows {
        let counts: Vec<String> = r.adherence.failures.iter().map(|n| n.to_string()).collect();
        s.push_str(&format!("| {} | {} | {} |\n", r.model, r.steps, counts.join(" | ")));
    }
    s.push_str(&format!("(failed images of {prompts} per row, by the first problem found)\n"));
    s
}

/// Tiles rows of equally sized images into one picture (a row per model and step count), with a
/// one-pixel white rule between them.
pub fn grid(rows: &[Vec<Image>]) -> Option<GeneratedImage> {
    let side = rows.iter().flatten().next()?.side;
    let cols = rows.iter().map(Vec::len).max()?;
    let (w, h) = (cols * (side + 1) + 1, rows.len() * (side + 1) + 1);
    let mut rgb = vec![255u8; w * h * 3];
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            for y in 0..side {
                let dst = 3 * ((1 + r * (side + 1) + y) * w + 1 + c * (side + 1));
                rgb[dst..dst + 3 * side].copy_from_slice(&img.rgb[3 * y * side..3 * (y + 1) * side]);
            }
        }
    }
    Some(GeneratedImage { width: w as u32, height: h as u32, rgb })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::Problem;
    use crate::grammar::{Color, Count, Object, Size};

    #[test]
    fn held_out_prompts_are_fixed_and_never_trained_on() {
        let a = held_out(20, 1);
        assert_eq!(a, held_out(20, 1));
        assert_eq!(a.len(), 40);
        assert!(a.iter().all(Prompt::is_held_out));
        assert_eq!(a.iter().filter(|p| p.objects.len() == 2).count(), 20);
    }

    #[test]
    fn adherence_is_split_by_kind_shape_and_size() {
        let object = |count, color, shape| Object { count, size: Size::Default, color, shape, position: None };
        let prompt = |objects| Prompt { objects, background: None };
        let small_blue_square = Object { size: Size::Small, ..object(Count::A, Color::Blue, Shape::Square) };
        let prompts = [
            prompt(vec![object(Count::A, Color::Red, Shape::Circle)]),
            prompt(vec![small_blue_square]),
            prompt(vec![object(Count::Two, Color::Green, Shape::Square)]),
            prompt(vec![object(Count::A, Color::Red, Shape::Triangle), object(Count::A, Color::Blue, Shape::Circle)]),
        ];
        let verdict = |adherent: bool, sizes_right: bool| Verdict { adherent, sizes_right, problem: None };
        let shape_wrong = Verdict {
            problem: Some(Problem { kind: ProblemKind::Shape, detail: "1 blue square: found 0".into() }),
            ..verdict(false, false)
        };
        let a = Adherence::of(&prompts, &[verdict(true, true), shape_wrong, verdict(true, false), verdict(true, true)]);
        assert_eq!(a.one, 2.0 / 3.0);
        assert_eq!(a.one_by_shape, [1.0, 0.5, 0.0], "circle 1 of 1, square 1 of 2, no triangle prompt");
        assert_eq!(a.one_by_size, [0.0, 1.0, 0.0], "small 0 of 1, default 2 of 2, no large prompt");
        assert_eq!(percents(&a.one_by_size), "0 / 100 / 0%");
        assert_eq!(a.two, 1.0);
        assert_eq!(a.sizes, 2.0 / 3.0);
        assert_eq!(a.failures, [0, 0, 1, 0, 0], "one image failed, on its shape");
    }

    #[test]
    fn grid_places_every_image() {
        let img = |v: u8| Image { side: 4, rgb: vec![v; 48] };
        let g = grid(&[vec![img(10), img(20)], vec![img(30)]]).expect("grid");
        assert_eq!((g.width, g.height), (11, 11));
        let px = |x: usize, y: usize| g.rgb[3 * (y * 11 + x)];
        assert_eq!((px(1, 1), px(6, 1), px(1, 6), px(6, 6), px(0, 0)), (10, 20, 30, 255, 255));
    }
}
