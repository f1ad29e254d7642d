//! Classical image analysis for prompt adherence: no learned model. Pixels are labelled by the nearest
//! palette colour, the one-pixel anti-aliased rims are eroded away (a red edge on yellow looks orange),
//! and each connected region of one colour becomes an object whose shape is read from how much of its
//! bounding box it fills: a square all of it, a circle π/4, an upright triangle half.

use crate::grammar::{Color, Prompt, Shape, Size, GREY};
use crate::render::Image;

/// Largest RGB distance at which a pixel still counts as a palette colour.
const MATCH_DISTANCE: f64 = 60.0;
/// Regions of fewer eroded pixels are specks, not objects.
const MIN_AREA: usize = 6;

/// A label: a palette colour, or `None` for mid-grey.
type Label = Option<Color>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Found {
    pub color: Color,
    pub shape: Option<Shape>,
    pub cx: f64,
    pub cy: f64,
    /// Half the bounding box.
    pub half: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Background, and the colour, shape, count and position of every object, as the prompt says.
    pub adherent: bool,
    /// Every object also has the prompt's size (checked apart: the goal is about adherence).
    pub sizes_right: bool,
    /// What was wrong first, for the evaluation's report.
    pub problem: Option<Problem>,
}

/// The kinds of thing an image can get wrong, in the order [`check`] looks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The background is not the prompt's colour.
    Background,
    /// An object phrase's colour comes out in too few or too many objects.
    Count,
    /// As many objects of the phrase's colour as it asks for, but not all of its shape.
    Shape,
    /// The right objects, one of them outside the phrase's third.
    Position,
    /// Everything asked for is there, and something more.
    Unexpected,
}

impl ProblemKind {
    pub const ALL: [Self; 5] = [Self::Background, Self::Count, Self::Shape, Self::Position, Self::Unexpected];

    pub fn word(self) -> &'static str {
        match self {
            Self::Background => "background",
            Self::Count => "count",
            Self::Shape => "shape",
            Self::Position => "position",
            Self::Unexpected => "unexpected",
        }
    }
}

/// The first thing found wrong with an image: its kind, for tallies, and what exactly, for people.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

fn label(px: [u8; 3]) -> Option<Label> {
    let dist = |c: [u8; 3]| px.iter().zip(c).map(|(&a, b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt();
    let mut best: (f64, Label) = (dist(GREY), None);
    for c in Color::ALL {
        let d = dist(c.rgb());
        if d < best.0 {
            best = (d, Some(c));
        }
    }
    (best.0 <= MATCH_DISTANCE).then_some(best.1)
}

/// The background label (most common along the border) and the objects found on it.
pub fn detect(image: &Image) -> (Option<Label>, Vec<Found>) {
    let n = image.side;
    let labels: Vec<Option<Label>> = (0..n * n).map(|i| label(image.pixel(i % n, i / n))).collect();
    let mut tally: Vec<(Option<Label>, usize)> = Vec::new();
    for i in 0..n {
        for idx in [i, (n - 1) * n + i, i * n, i * n + n - 1] {
            match tally.iter_mut().find(|(l, _)| *l == labels[idx]) {
                Some(t) => t.1 += 1,
                None => tally.push((labels[idx], 1)),
            }
        }
    }
    let background = tally.iter().max_by_key(|t| t.1).and_then(|t| t.0);
    // Core pixels: a foreground colour whose four neighbours all share it.
    let core = |x: usize, y: usize| -> Option<Color> {
        let l = labels[y * n + x]?;
        let c = l?;
        if Some(l) == background || x == 0 || y == 0 || x + 1 == n || y + 1 == n {
            return None;
        }
        let same = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)].iter().all(|&(a, b)| labels[b * n + a] == Some(Some(c)));
        same.then_some(c)
    };
    let cores: Vec<Option<Color>> = (0..n * n).map(|i| core(i % n, i / n)).collect();
    let mut seen = vec![false; n * n];
    let mut found = Vec::new();
    for start in 0..n * n {
        let Some(color) = cores[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let (mut area, mut x0, mut x1, mut y0, mut y1) = (0usize, n, 0, n, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % n, i / n);
            area += 1;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            let mut visit = |j: usize| {
                if !seen[j] && cores[j] == Some(color) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < n {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - n);
            }
            if y + 1 < n {
                visit(i + n);
            }
        }
        if area < MIN_AREA {
            continue;
        }
        let bg = match background {
            Some(Some(c)) => c.rgb(),
            _ => GREY,
        };
        found.push(measure(image, color, bg, (x0, x1, y0, y1)));
    }
    (background, found)
}

/// Shape, centre and size of one object from its pixels' coverage: each pixel near the eroded core is
/// read as a mix `background + α (colour - background)`, which recovers the anti-aliased edges the
/// erosion removed. Width and height sum each column's and row's largest α, so a fill ratio of area to
/// box tells a square (1), a circle (π/4) and an upright triangle (½) apart even at 12 px.
fn measure(image: &Image, color: Color, bg: [u8; 3], (x0, x1, y0, y1): (usize, usize, usize, usize)) -> Found {
    let n = image.side;
    let c = color.rgb();
    let d: [f64; 3] = std::array::from_fn(|k| c[k] as f64 - bg[k] as f64);
    let dd: f64 = d.iter().map(|v| v * v).sum();
    let (xa, xb, ya, yb) = (x0.saturating_sub(2), (x1 + 2).min(n - 1), y0.saturating_sub(2), (y1 + 2).min(n - 1));
    let (w, h) = (xb - xa + 1, yb - ya + 1);
    let mut cols = vec![0f64; w];
    let mut rows = vec![0f64; h];
    let mut area = 0.0;
    for y in ya..=yb {
        for x in xa..=xb {
            let p = image.pixel(x, y);
            let v: [f64; 3] = std::array::from_fn(|k| p[k] as f64 - bg[k] as f64);
            let a = (v.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>() / dd).clamp(0.0, 1.0);
            let residual = v.iter().zip(&d).map(|(v, d)| (v - a * d).powi(2)).sum::<f64>().sqrt();
            let a = if residual < MATCH_DISTANCE { a } else { 0.0 };
            area += a;
            cols[x - xa] = cols[x - xa].max(a);
            rows[y - ya] = rows[y - ya].max(a);
        }
    }
    let extent = |m: &[f64]| m.iter().sum::<f64>();
    let centre = |m: &[f64], start: usize| {
        m.iter().enumerate().map(|(i, _)| (start + i) as f64 + 0.5).zip(m).map(|(p, a)| p * a).sum::<f64>() / extent(m).max(1e-9)
    };
    let (bw, bh) = (extent(&cols), extent(&rows));
    let fill = area / (bw * bh).max(1e-9);
    let shape = if !(0.6..=1.6).contains(&(bw / bh.max(1e-9))) {
        None
    } else if fill >= 0.89 {
        Some(Shape::Square)
    } else if fill >= 0.70 {
        Some(Shape::Circle)
    } else if fill >= 0.35 {
        Some(Shape::Triangle)
    } else {
        None
    };
    Found { color, shape, cx: centre(&cols, xa), cy: centre(&rows, ya), half: bw.max(bh) / 2.0 }
}

fn size_of(half: f64) -> Size {
    if half < 7.75 {
        Size::Small
    } else if half <= 11.75 {
        Size::Default
    } else {
        Size::Large
    }
}

/// Checks an image against its prompt.
pub fn check(prompt: &Prompt, image: &Image) -> Verdict {
    let (background, found) = detect(image);
    let fail = |kind, detail| Verdict { adherent: false, sizes_right: false, problem: Some(Problem { kind, detail }) };
    if background != Some(prompt.background) {
        let name = |l: Option<Label>| match l {
            Some(Some(c)) => c.word(),
            Some(None) => "grey",
            None => "unclear",
        };
        return fail(ProblemKind::Background, format!("background is {}, not {}", name(background), name(Some(prompt.background))));
    }
    let mut used = vec![false; found.len()];
    let mut sizes_right = true;
    for o in &prompt.objects {
        let mine: Vec<usize> = (0..found.len()).filter(|&i| found[i].color == o.color && found[i].shape == Some(o.shape)).collect();
        if mine.len() != o.count.n() {
            let same_colour = found.iter().filter(|f| f.color == o.color).count();
            let kind = if same_colour == o.count.n() { ProblemKind::Shape } else { ProblemKind::Count };
            return fail(kind, format!("{} {} {}: found {}", o.count.n(), o.color.word(), o.shape.word(true), mine.len()));
        }
        for &i in &mine {
            used[i] = true;
            let f = found[i];
            if let Some(p) = o.position {
                if !p.contains(f.cx, f.cy, image.side as f64) {
                    return fail(
                        ProblemKind::Position,
                        format!("{} {} at ({:.0}, {:.0}) is not {}", o.color.word(), o.shape.word(false), f.cx, f.cy, p.words()),
                    );
                }
            }
            sizes_right &= size_of(f.half) == o.size;
        }
    }
    if let Some(i) = used.iter().position(|u| !u) {
        let f = found[i];
        return fail(
            ProblemKind::Unexpected,
            format!("unexpected {} {} at ({:.0}, {:.0})", f.color.word(), f.shape.map_or("blob", |s| s.word(false)), f.cx, f.cy),
        );
    }
    Verdict { adherent: true, sizes_right, problem: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::Position;
    use crate::render::{paint, sample_scene, Placed};
    use crate::rng::Rng;

    #[test]
    fn rendered_scenes_adhere_to_their_prompts() {
        let mut rng = Rng::new(5);
        let mut sizes = 0;
        for i in 0..1000 {
            let (prompt, image) = sample_scene(&mut rng, 1 + i % 2, i % 3 == 0);
            let v = check(&prompt, &image);
            assert!(v.adherent, "{}: {:?}", prompt.text(), v.problem);
            sizes += usize::from(v.sizes_right);
        }
        assert!(sizes > 980, "sizes right in {sizes} of 1000");
    }

    #[test]
    fn wrong_images_are_caught() {
        let mut rng = Rng::new(9);
        let (prompt, image) = sample_scene(&mut rng, 1, false);
        let (other, _) = std::iter::repeat_with(|| sample_scene(&mut rng, 1, false))
            .find(|(p, _)| p.objects[0].color != prompt.objects[0].color)
            .expect("scene");
        assert!(!check(&other, &image).adherent);
        // An empty canvas of the right background has no objects.
        let empty = paint(prompt.background_rgb(), &[]);
        let v = check(&prompt, &empty);
        assert!(!v.adherent && v.problem.as_ref().is_some_and(|p| p.kind == ProblemKind::Count && p.detail.contains("found 0")), "{v:?}");
    }

    /// Each way of going wrong is told apart: one prompt, one painted mistake each.
    #[test]
    fn problems_are_classified_by_kind() {
        use crate::grammar::{Count, Object};
        let circle_left =
            Object { count: Count::A, size: Size::Default, color: Color::Red, shape: Shape::Circle, position: Some(Position::Left) };
        let prompt = Prompt { objects: vec![circle_left], background: None };
        let red = |shape, cx| Placed { color: Color::Red, shape, cx, cy: 32.0, half: 9.0 };
        let blue_square = Placed { color: Color::Blue, shape: Shape::Square, cx: 48.0, cy: 12.0, half: 6.0 };
        let cases = [
            (paint(GREY, &[red(Shape::Circle, 12.0)]), None),
            (paint(Color::Blue.rgb(), &[red(Shape::Circle, 12.0)]), Some(ProblemKind::Background)),
            (paint(GREY, &[]), Some(ProblemKind::Count)),
            (paint(GREY, &[red(Shape::Circle, 12.0), red(Shape::Circle, 48.0)]), Some(ProblemKind::Count)),
            (paint(GREY, &[red(Shape::Square, 12.0)]), Some(ProblemKind::Shape)),
            (paint(GREY, &[red(Shape::Circle, 48.0)]), Some(ProblemKind::Position)),
            (paint(GREY, &[red(Shape::Circle, 12.0), blue_square]), Some(ProblemKind::Unexpected)),
        ];
        for (i, (image, want)) in cases.iter().enumerate() {
            let v = check(&prompt, image);
            assert_eq!(v.problem.as_ref().map(|p| p.kind), *want, "case {i}: {v:?}");
            assert_eq!(v.adherent, want.is_none(), "case {i}");
        }
    }

    #[test]
    fn shapes_are_told_apart() {
        for (shape, half) in
            [(Shape::Circle, 6.0), (Shape::Square, 6.0), (Shape::Triangle, 6.0), (Shape::Circle, 13.5), (Shape::Triangle, 9.5)]
        {
            let img = paint(GREY, &[Placed { color: Color::Blue, shape, cx: 30.3, cy: 33.7, half }]);
            let (_, found) = detect(&img);
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].shape, Some(shape), "{shape:?} at half {half}");
            assert!((found[0].half - half).abs() < 1.5, "{:?}", found[0]);
            assert!(Position::Center.contains(found[0].cx, found[0].cy, 64.0));
        }
    }

    #[test]
    fn small_shapes_are_read_at_every_colour_pair_and_subpixel_offset() {
        let mut wrong = Vec::new();
        for bg in Color::ALL.iter().map(|c| c.rgb()).chain([GREY]) {
            for color in Color::ALL.into_iter().filter(|c| c.rgb() != bg) {
                for shape in Shape::ALL {
                    for half in [5.5, 6.5] {
                        for off in 0..4 {
                            let (dx, dy) = (off as f64 * 0.25, (3 - off) as f64 * 0.25);
                            let img = paint(bg, &[Placed { color, shape, cx: 30.0 + dx, cy: 33.0 + dy, half }]);
                            let (_, found) = detect(&img);
                            if found.len() != 1 || found[0].shape != Some(shape) || found[0].color != color {
                                wrong.push(format!("{color:?} {shape:?} {half} on {bg:?}: {found:?}"));
                            }
                        }
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{} misread, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(3)]);
    }
}
