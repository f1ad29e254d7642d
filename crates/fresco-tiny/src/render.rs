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
    let n = SUPERSAMPLE as f64;
    for s in shapes {
        let x0 = (s.cx - s.half).floor().max(0.0) as usize;
        let x1 = ((s.cx + s.half).ceil() as usize).min(SIDE - 1);
        let y0 = (s.cy - s.half).floor().max(0.0) as usize;
        let y1 = ((s.cy + s.half).ceil() as usize).min(SIDE - 1);
        let rgb = s.color.rgb().map(f64::from);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let mut hits = 0usize;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let (px, py) = (x as f64 + (sx as f64 + 0.5) / n, y as f64 + (sy as f64 + 0.5) / n);
                        hits += usize::from(s.contains(px, py));
                    }
                }
                let a = hits as f64 / (n * n);
                let i = 3 * (y * SIDE + x);
                for c in 0..3 {
                    acc[i + c] = acc[i + c] * (1.0 - a) + rgb[c] * a;
                }
            }
        }
    }
    Image { side: SIDE, rgb: acc.iter().map(|v| v.round().clamp(0.0, 255.0) as u8).collect() }
}

/// A prompt that fits, drawn at random (held-out prompts only when `held_out`), and its image.
pub fn sample_scene(rng: &mut Rng, objects: usize, held_out: bool) -> (Prompt, Image) {
    loop {
        let prompt = Prompt::sample_split(rng, objects, held_out);
        if let Some(shapes) = layout(&prompt, rng) {
            let image = paint(prompt.background_rgb(), &shapes);
            return (prompt, image);
        }
    }
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
}
