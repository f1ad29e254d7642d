//! The prompt grammar of fresco-tiny's world:
//!
//! ```text
//! prompt   := object [" and " object] [" on a " COLOR " background"]
//! object   := COUNT [" " SIZE] " " COLOR " " SHAPE [" " POSITION]     (plural shape after two/three)
//! ```
//!
//! A position goes with at most two objects and "in the center" with one; an object never has the
//! background's colour, and two phrases of one prompt never name the same colour and shape (so that
//! counting them stays unambiguous).

use fresco_core::seed::mix64 as mix;

use crate::rng::Rng;

/// Mid-grey, the background when a prompt names none.
pub const GREY: [u8; 3] = [128, 128, 128];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Color {
    pub const ALL: [Color; 8] = [Self::Red, Self::Green, Self::Blue, Self::Yellow, Self::Purple, Self::Orange, Self::White, Self::Black];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [220, 40, 40],
            Self::Green => [40, 180, 60],
            Self::Blue => [40, 80, 220],
            Self::Yellow => [240, 210, 40],
            Self::Purple => [140, 60, 180],
            Self::Orange => [245, 140, 30],
            Self::White => [245, 245, 245],
            Self::Black => [20, 20, 20],
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Purple => "purple",
            Self::Orange => "orange",
            Self::White => "white",
            Self::Black => "black",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Self::Circle, Self::Square, Self::Triangle];

    pub fn word(self, plural: bool) -> &'static str {
        match (self, plural) {
            (Self::Circle, false) => "circle",
            (Self::Circle, true) => "circles",
            (Self::Square, false) => "square",
            (Self::Square, true) => "squares",
            (Self::Triangle, false) => "triangle",
            (Self::Triangle, true) => "triangles",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    Small,
    Default,
    Large,
}

impl Size {
    pub const ALL: [Size; 3] = [Self::Small, Self::Default, Self::Large];

    /// Range of half the bounding box, in pixels.
    pub fn half_range(self) -> (f64, f64) {
        match self {
            Self::Small => (5.5, 6.5),
            Self::Default => (9.0, 10.0),
            Self::Large => (13.0, 14.0),
        }
    }

    fn word(self) -> Option<&'static str> {
        match self {
            Self::Small => Some("small"),
            Self::Default => None,
            Self::Large => Some("large"),
        }
    }
}

/// Thirds of the image, judged by the centre of a shape's bounding box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Center,
}

impl Position {
    pub const ALL: [Position; 5] = [Self::Left, Self::Right, Self::Top, Self::Bottom, Self::Center];

    pub fn words(self) -> &'static str {
        match self {
            Self::Left => "on the left",
            Self::Right => "on the right",
            Self::Top => "at the top",
            Self::Bottom => "at the bottom",
            Self::Center => "in the center",
        }
    }

    /// Whether a bounding-box centre `(x, y)` lies in this position of a `side`×`side` image.
    pub fn contains(self, x: f64, y: f64, side: f64) -> bool {
        let third = |v: f64| {
            if v < side / 3.0 {
                0
            } else if v < 2.0 * side / 3.0 {
                1
            } else {
                2
            }
        };
        match self {
            Self::Left => third(x) == 0,
            Self::Right => third(x) == 2,
            Self::Top => third(y) == 0,
            Self::Bottom => third(y) == 2,
            Self::Center => third(x) == 1 && third(y) == 1,
        }
    }
}

/// How many, as the prompt words it: "a" and "one" both mean one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Count {
    A,
    One,
    Two,
    Three,
}

impl Count {
    pub const ALL: [Count; 4] = [Self::A, Self::One, Self::Two, Self::Three];

    pub fn n(self) -> usize {
        match self {
            Self::A | Self::One => 1,
            Self::Two => 2,
            Self::Three => 3,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::One => "one",
            Self::Two => "two",
            Self::Three => "three",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Object {
    pub count: Count,
    pub size: Size,
    pub color: Color,
    pub shape: Shape,
    pub position: Option<Position>,
}

impl Object {
    fn text(&self) -> String {
        let mut words = vec![self.count.word()];
        words.extend(self.size.word());
        words.push(self.color.word());
        words.push(self.shape.word(self.count.n() > 1));
        if let Some(p) = self.position {
            words.push(p.words());
        }
        words.join(" ")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prompt {
    pub objects: Vec<Object>,
    pub background: Option<Color>,
}

impl Prompt {
    pub fn text(&self) -> String {
        let mut s = self.objects.iter().map(Object::text).collect::<Vec<_>>().join(" and ");
        if let Some(bg) = self.background {
            s.push_str(&format!(" on a {} background", bg.word()));
        }
        s
    }

    pub fn background_rgb(&self) -> [u8; 3] {
        self.background.map(Color::rgb).unwrap_or(GREY)
    }

    /// A random prompt with `objects` object phrases (1 or 2) that obeys the grammar's rules. Whether it
    /// can be laid out is the renderer's question.
    pub fn sample(rng: &mut Rng, objects: usize) -> Self {
        let background = if rng.chance(0.5) { Some(*rng.pick(&Color::ALL)) } else { None };
        let mut out: Vec<Object> = Vec::with_capacity(objects);
        while out.len() < objects {
            let count = *rng.pick(&Count::ALL);
            let color = *rng.pick(&Color::ALL);
            let shape = *rng.pick(&Shape::ALL);
            if Some(color) == background || out.iter().any(|o| o.color == color && o.shape == shape) {
                continue;
            }
            let position = if rng.chance(0.5) { Some(*rng.pick(&Position::ALL)) } else { None };
            let candidate = Object { count, size: *rng.pick(&Size::ALL), color, shape, position };
            if let Some(p) = position {
                let already: usize = out.iter().filter(|o| o.position == Some(p)).map(|o| o.count.n()).sum();
                let cap = if p == Position::Center { 1 } else { 2 };
                if already + count.n() > cap {
                    continue;
                }
            }
            out.push(candidate);
        }
        Self { objects: out, background }
    }

    /// Like [`Prompt::sample`], drawing again until the prompt is on the asked side of the held-out split.
    pub fn sample_split(rng: &mut Rng, objects: usize, held_out: bool) -> Self {
        loop {
            let prompt = Self::sample(rng, objects);
            if prompt.is_held_out() == held_out {
                return prompt;
            }
        }
    }

    /// One prompt text in ten is held out of training and kept for evaluation.
    pub fn is_held_out(&self) -> bool {
        let text = self.text();
        let h = text.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3));
        mix(h).is_multiple_of(10)
    }
}

/// Every word a prompt of this grammar can contain.
pub fn words() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = vec!["and", "on", "a", "background"];
    words.extend(Count::ALL.iter().map(|c| c.word()));
    words.extend(Size::ALL.iter().filter_map(|s| s.word()));
    words.extend(Color::ALL.iter().map(|c| c.word()));
    words.extend(Shape::ALL.iter().flat_map(|s| [s.word(false), s.word(true)]));
    words.extend(Position::ALL.iter().flat_map(|p| p.words().split(' ')));
    words.sort_unstable();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_follow_the_grammar() {
        let p = Prompt {
            objects: vec![
                Object { count: Count::Two, size: Size::Large, color: Color::Red, shape: Shape::Circle, position: Some(Position::Left) },
                Object { count: Count::A, size: Size::Default, color: Color::Blue, shape: Shape::Triangle, position: None },
            ],
            background: Some(Color::White),
        };
        assert_eq!(p.text(), "two large red circles on the left and a blue triangle on a white background");
    }

    #[test]
    fn sampled_prompts_obey_the_rules() {
        let mut rng = Rng::new(3);
        let mut held = 0;
        for i in 0..5000 {
            let p = Prompt::sample(&mut rng, 1 + i % 2);
            for o in &p.objects {
                assert_ne!(Some(o.color), p.background, "{}", p.text());
            }
            for pos in Position::ALL {
                let n: usize = p.objects.iter().filter(|o| o.position == Some(pos)).map(|o| o.count.n()).sum();
                assert!(n <= if pos == Position::Center { 1 } else { 2 }, "{}", p.text());
            }
            held += usize::from(p.is_held_out());
        }
        assert!((300..700).contains(&held), "held out {held} of 5000");
    }

    #[test]
    fn the_word_list_covers_every_prompt() {
        let words = words();
        let mut rng = Rng::new(5);
        for i in 0..2000 {
            let p = Prompt::sample(&mut rng, 1 + i % 2);
            for w in p.text().split(' ') {
                assert!(words.contains(&w), "{w:?} of {:?}", p.text());
            }
        }
    }

    #[test]
    fn positions_are_thirds() {
        assert!(Position::Left.contains(10.0, 50.0, 64.0));
        assert!(!Position::Left.contains(22.0, 50.0, 64.0));
        assert!(Position::Center.contains(32.0, 32.0, 64.0));
        assert!(!Position::Center.contains(32.0, 10.0, 64.0));
        assert!(Position::Bottom.contains(5.0, 60.0, 64.0));
    }
}
