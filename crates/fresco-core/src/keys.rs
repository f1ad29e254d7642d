//! Where a job's images land: `{output}/{job_id}/{index:08}.{ext}` plus `{index:08}.json` beside it.
//! Keys are a pure function of (job, index, format), so a retried prompt overwrites its own objects.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::JobId;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpg",
            Self::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        })
    }
}

impl FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(Self::Png),
            "jpg" | "jpeg" => Ok(Self::Jpeg),
            "webp" => Ok(Self::Webp),
            other => Err(format!("unknown image format {other:?} (expected png, jpeg or webp)")),
        }
    }
}

/// The two object keys of one prompt, relative to the job's output location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKeys {
    pub image: String,
    pub sidecar: String,
}

impl ObjectKeys {
    pub fn new(job: JobId, index: u64, format: ImageFormat) -> Self {
        Self { image: format!("{job}/{index:08}.{}", format.extension()), sidecar: format!("{job}/{index:08}.json") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let job: JobId = "6f1c1d0e-0000-4000-8000-000000000001".parse().unwrap();
        let k = ObjectKeys::new(job, 42, ImageFormat::Webp);
        assert_eq!(k.image, format!("{job}/00000042.webp"));
        assert_eq!(k.sidecar, format!("{job}/00000042.json"));
    }

    #[test]
    fn formats_parse_case_insensitively() {
        assert_eq!("JPG".parse::<ImageFormat>().unwrap(), ImageFormat::Jpeg);
        assert!("gif".parse::<ImageFormat>().is_err());
    }
}
