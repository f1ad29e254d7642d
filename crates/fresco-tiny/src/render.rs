//! Lays a prompt's objects out on a 64×64 canvas and paints them as flat, anti-aliased shapes.

use crate::grammar::{Color, Position, Prompt, Shape};
use crate::rng::Rng;

pub const SIDE: usize = 64;
/// Clear pixels between two bounding boxes, so shapes never touch.
const GAP: f64 = 3.0;
/// How far inside its third a positioned shape's centre stays, so its position is never borderline.
const POSITION_MARGIN: f64 = 1.5;
const SUPERSAMPLE: usize = 4;

/// An RGB image, rows top to bottom.
#[derive(Clone, PartialEq, Eq)]
pub struct Image {
    pub side: usize,
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({0}×{0})", self.side)
    }
}

impl Image {
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.side + x);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

/// One shape as drawn: centre and half the bounding box, in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placed {
    pub color: Color,
    pub shape: Shape,
    pub cx: f64,
    pub cy: f64,
    pub half: f64,
}

impl Placed {
    fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.cx, y - self.cy);
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= self.half * self.half,
            Shape::Square => dx.abs() <= self.half && dy.abs() <= self.half,
            // Upright: apex at the top centre, base along the bottom edge of the box.
            Shape::Triangle => dy.abs() <= self.half && dx.abs() <= (dy + self.half) / 2.0,
        }
    }

    /// The pixels of the shape's bounding box, clipped to the canvas: x0, x1, y0, y1, inclusive.
    fn pixels(&self) -> (usize, usize, usize, usize) {
        let x0 = (self.cx - self.half).floor().max(0.0) as usize;
        let x1 = ((self.cx + self.half).ceil() as usize).min(SIDE - 1);
        let y0 = (self.cy - self.half).floor().max(0.0) as usize;
        let y1 = ((self.cy + self.half).ceil() as usize).min(SIDE - 1);
        (x0, x1, y0, y1)
    }

    /// The fraction of pixel (x, y) the shape covers.
    fn coverage(&self, x: usize, y: usize) -> f64 {
        let n = SUPERSAMPLE as f64;
        let mut hits = 0usize;
        for sy in 0..SUPERSAMPLE {
            for sx in 0..SUPERSAMPLE {
                let (px, py) = (x as f64 + (sx as f64 + 0.5) / n, y as f64 + (sy as f64 + 0.5) / n);
                hits += usize::from(self.contains(px, py));
            }
        }
        hits as f64 / (n * n)
    }

    /// Its class in [`layout_map`]: 0 is the background, then colour by colour, shape by shape.
    fn class(&self) -> usize {
        1 + self.color as usize * Shape::ALL.len() + self.shape as usize
    }

    fn apart(&self, other: &Placed) -> bool {
        let reach = self.half + other.half + GAP;
        (self.cx - other.cx).abs() >= reach || (self.cy - other.cy).abs() >= reach
    }
}

/// Positions for every object of the prompt, or `None` when random placement fails (some prompts, like
/// three large squares and three large circles, do not fit at all).
pub fn layout(prompt: &Prompt, rng: &mut Rng) -> Option<Vec<Placed>> {
    let side = SIDE as f64;
    let third = side / 3.0;
    // Positioned and larger objects first: they have the least room.
    let mut wanted: Vec<(Color, Shape, crate::grammar::Size, Option<Position>)> = Vec::new();
    for o in &prompt.objects {
        for _ in 0..o.count.n() {
            wanted.push((o.color, o.shape, o.size, o.position));
        }
    }
    wanted.sort_by_key(|w| (w.3.is_none(), std::cmp::Reverse(w.2 as u8)));
    'attempt: for _ in 0..30 {
        let mut placed: Vec<Placed> = Vec::with_capacity(wanted.len());
        for &(color, shape, size, position) in &wanted {
            let (lo, hi) = size.half_range();
            let half = rng.range(lo, hi);
            let mut xr = (half + 1.0, side - 1.0 - half);
            let mut yr = xr;
            let inner = |r: (f64, f64), a: f64, b: f64| (r.0.max(a + POSITION_MARGIN), r.1.min(b - POSITION_MARGIN));
            match position {
                Some(Position::Left) => xr = inner(xr, 0.0, third),
                Some(Position::Right) => xr = inner(xr, 2.0 * third, side),
                Some(Position::Top) => yr = inner(yr, 0.0, third),
                Some(Position::Bottom) => yr = inner(yr, 2.0 * third, side),
                Some(Position::Center) => {
                    xr = inner(xr, third, 2.0 * third);
                    yr = inner(yr, third, 2.0 * third);
                }
                None => {}
            }
            if xr.0 > xr.1 || yr.0 > yr.1 {
                return None;
            }
            let mut ok = None;
            for _ in 0..60 {
                let p = Placed { color, shape, cx: rng.range(xr.0, xr.1), cy: rng.range(yr.0, yr.1), half };
                if placed.iter().all(|q| q.apart(&p)) {
                    ok = Some(p);
                    break;
                }
            }
            match ok {
                Some(p) => placed.push(p),
                None => continue 'attempt,
            }
        }
        return Some(placed);
    }
    None
}

/// Paints the shapes over the background, each pixel's colour mixed by the shape's coverage of it.
pub fn paint(background: [u8; 3], shapes: &[Placed]) -> Image {
    let mut acc: Vec<f64> = (0..SIDE * SIDE).flat_map(|_| background.map(f64::from)).collect();
    for s in shapes {
        let (x0, x1, y0, y1) = s.pixels();
        let rgb = s.color.rgb().map(f64::from);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let a = s.coverage(x, y);
                let i = 3 * (y * SIDE + x);
                for c in 0..3 {
                    acc[i + c] = acc[i + c] * (1.0 - a) + rgb[c] * a;
                }
            }
        }
    }
    Image { side: SIDE, rgb: acc.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect() }
}

/// The scene a prompt describes, its shapes as laid out painted over its background.
pub fn paint_scene(prompt: &Prompt, shapes: &[Placed]) -> Image {
    paint(prompt.background_rgb(), shapes)
}

/// Classes of [`layout_map`]: the background, then every colour–shape pair.
pub const LAYOUT_CLASSES: usize = 1 + Color::ALL.len() * Shape::ALL.len();

/// What covers each cell of the canvas divided into `grid` × `grid` cells (of [`SIDE`] / `grid` pixels):
/// per cell, row by row, the fraction of its area each of the [`LAYOUT_CLASSES`] covers, summing to 1.
/// The scene's layout as a denoiser should know it (`train::layout`).
pub fn layout_map(shapes: &[Placed], grid: usize) -> Vec<f32> {
    if grid == 0 {
        return Vec::new();
    }
    let cell = SIDE / grid.min(SIDE);
    let area = (cell * cell) as f64;
    let mut map = vec![0f64; grid * grid * LAYOUT_CLASSES];
    // A grid that does not divide the canvas folds its last pixels into the last cells.
    let at = |p: usize| (p / cell).min(grid - 1);
    for s in shapes {
        let (x0, x1, y0, y1) = s.pixels();
        for y in y0..=y1 {
            for x in x0..=x1 {
                map[(at(y) * grid + at(x)) * LAYOUT_CLASSES + s.class()] += s.coverage(x, y) / area;
            }
        }
    }
    // Shapes never overlap, so what they leave of a cell is background.
    for c in map.chunks_mut(LAYOUT_CLASSES) {
        c[0] = (1.0 - c[1..].iter().sum::<f64>()).max(0.0);
    }
    map.into_iter().map(|v| v as f32).collect()
}

/// Where each object's centre lies on the canvas divided into `grid` × `grid` cells: per cell, row by row,
/// a one-hot over the [`LAYOUT_CLASSES`] — the class of the object whose bounding box is centred in it,
/// else the background. Shapes keep [`GAP`] pixels apart, so centres lie at least 14 pixels apart on one
/// axis and no cell of 8 pixels or less holds two: the map counts the objects, where [`layout_map`]'s
/// coverage leaves one large object and two small ones alike.
pub fn centre_map(shapes: &[Placed], grid: usize) -> Vec<f32> {
    if grid == 0 {
        return Vec::new();
    }
    let mut map = vec![0f32; grid * grid * LAYOUT_CLASSES];
    let cell = SIDE as f64 / grid as f64;
    let at = |p: f64| ((p / cell).floor().max(0.0) as usize).min(grid - 1);
    let mut taken = vec![0; grid * grid];
    for s in shapes {
        taken[at(s.cy) * grid + at(s.cx)] = s.class();
    }
    for (c, class) in map.chunks_mut(LAYOUT_CLASSES).zip(taken) {
        c[class] = 1.0;
    }
    map
}

/// A prompt that fits, drawn at random (held-out prompts only when `held_out`), and its shapes as laid out.
pub fn sample_layout(rng: &mut Rng, objects: usize, held_out: bool) -> (Prompt, Vec<Placed>) {
    loop {
        let prompt = Prompt::sample_split(rng, objects, held_out);
        if let Some(shapes) = layout(&prompt, rng) {
            return (prompt, shapes);
        }
    }
}

/// A prompt that fits, drawn at random (held-out prompts only when `held_out`), and its image.
pub fn sample_scene(rng: &mut Rng, objects: usize, held_out: bool) -> (Prompt, Image) {
    let (prompt, shapes) = sample_layout(rng, objects, held_out);
    let image = paint_scene(&prompt, &shapes);
    (prompt, image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_respect_positions_and_never_overlap() {
        let mut rng = Rng::new(11);
        for i in 0..2000 {
            let prompt = Prompt::sample(&mut rng, 1 + i % 2);
            let Some(shapes) = layout(&prompt, &mut rng) else { continue };
            let want: usize = prompt.objects.iter().map(|o| o.count.n()).sum();
            assert_eq!(shapes.len(), want);
            for (a, s) in shapes.iter().enumerate() {
                assert!(s.cx - s.half >= 1.0 && s.cx + s.half <= 63.0, "{s:?}");
                for t in &shapes[a + 1..] {
                    assert!(s.apart(t), "{}: {s:?} {t:?}", prompt.text());
                }
                let o = prompt.objects.iter().find(|o| o.color == s.color && o.shape == s.shape).expect("object");
                if let Some(p) = o.position {
                    assert!(p.contains(s.cx, s.cy, 64.0), "{}: {s:?}", prompt.text());
                }
            }
        }
    }

    #[test]
    fn painting_is_antialiased_and_flat() {
        let s = Placed { color: Color::Red, shape: Shape::Square, cx: 32.5, cy: 32.0, half: 8.0 };
        let img = paint([128, 128, 128], &[s]);
        assert_eq!(img.pixel(32, 32), [220, 40, 40]);
        assert_eq!(img.pixel(2, 2), [128, 128, 128]);
        // The left edge at x = 24.5 covers half of pixel 24.
        assert_eq!(img.pixel(24, 32), [174, 84, 84]);
    }

    /// A blue square over latent cells 1..=2 by 4..=5, and a red circle centred in cell 6 of row 1.
    fn square_and_circle() -> (Placed, Placed) {
        (
            Placed { color: Color::Blue, shape: Shape::Square, cx: 16.0, cy: 40.0, half: 8.0 },
            Placed { color: Color::Red, shape: Shape::Circle, cx: 48.5, cy: 12.5, half: 6.0 },
        )
    }

    /// Each cell's fractions sum to one, and a shape's class holds exactly its painted area.
    #[test]
    fn the_layout_map_accounts_for_every_pixel() {
        let (square, circle) = square_and_circle();
        let map = layout_map(&[square, circle], 8);
        assert_eq!(map.len(), 64 * LAYOUT_CLASSES);
        for cell in map.chunks(LAYOUT_CLASSES) {
            assert!((cell.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{cell:?}");
        }
        // The 16×16 square covers cells 1..=2 by 4..=5 whole: four cells of 64 pixels each.
        let blue_square = square.class();
        let area: f32 = map.chunks(LAYOUT_CLASSES).map(|c| c[blue_square]).sum::<f32>() * 64.0;
        assert!((area - 256.0).abs() < 1e-3, "{area}");
        assert_eq!(map[(4 * 8 + 1) * LAYOUT_CLASSES + blue_square], 1.0);
        let red_circle = circle.class();
        let area: f32 = map.chunks(LAYOUT_CLASSES).map(|c| c[red_circle]).sum::<f32>() * 64.0;
        assert!((area - std::f32::consts::PI * 36.0).abs() < 2.0, "{area}");
        assert_ne!(blue_square, red_circle);
        assert!(map.chunks(LAYOUT_CLASSES).all(|c| c[1..].iter().filter(|&&v| v > 0.0).count() <= 1));
        // Grids that do not divide the canvas are answered, not a panic.
        assert_eq!(layout_map(&[square, circle], 7).len(), 49 * LAYOUT_CLASSES);
        assert!(layout_map(&[square], 0).is_empty());
    }

    /// One cell per object, in its class, at its centre; every other cell background; and on the latent
    /// grid no two objects of any laid-out scene share a cell, so the map's cells count the objects.
    #[test]
    fn the_centre_map_marks_one_cell_per_object() {
        let (square, circle) = square_and_circle();
        // A centre on the canvas's right edge belongs to the last cell.
        let edge = Placed { cx: 64.0, cy: 0.0, ..circle };
        let map = centre_map(&[square, circle, edge], 8);
        assert_eq!(map.len(), 64 * LAYOUT_CLASSES);
        let classes: Vec<usize> = map.chunks(LAYOUT_CLASSES).map(|c| c.iter().position(|&v| v == 1.0).expect("one-hot")).collect();
        assert!(map.chunks(LAYOUT_CLASSES).all(|c| c.iter().sum::<f32>() == 1.0));
        assert_eq!(classes[5 * 8 + 2], square.class());
        assert_eq!(classes[8 + 6], circle.class());
        assert_eq!(classes[7], circle.class());
        assert_eq!(classes.iter().filter(|&&c| c != 0).count(), 3);
        assert!(centre_map(&[square], 0).is_empty());
        let mut rng = Rng::new(4);
        for objects in [1, 2, 2, 2] {
            for _ in 0..50 {
                let (_, shapes) = sample_layout(&mut rng, objects, false);
                let marked = centre_map(&shapes, 8).chunks(LAYOUT_CLASSES).filter(|c| c[0] == 0.0).count();
                assert_eq!(marked, shapes.len(), "{shapes:?}");
            }
        }
    }
}
