//! Turning decoded tensors into image files: PNG with the generation parameters in a `parameters` tEXt
//! chunk (the key most image tools read), JPEG and WebP on request.

use candle_core::{DType, Tensor};
use fresco_core::ImageFormat;

use crate::error::{PipelineError, Result};

/// An 8-bit RGB image. The pixel buffer stays out of Debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

impl std::fmt::Debug for GeneratedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GeneratedImage({}x{}, {} bytes)", self.width, self.height, self.rgb.len())
    }
}

impl GeneratedImage {
    /// Images from a decoded `[B, 3, H, W]` batch in [-1, 1], rounded as diffusers' `numpy_to_pil` does.
    pub fn from_decoded(x: &Tensor) -> Result<Vec<Self>> {
        let (b, c, h, w) = x.dims4()?;
        if c != 3 {
            return Err(PipelineError::Unsupported(format!("the VAE produced {c} channels; only RGB is supported")));
        }
        let x = ((x.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let x = (x * 255.0)?.round()?.permute((0, 2, 3, 1))?.contiguous()?;
        let data: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let per = h * w * 3;
        Ok((0..b)
            .map(|i| Self { width: w as u32, height: h as u32, rgb: data[i * per..(i + 1) * per].iter().map(|v| *v as u8).collect() })
            .collect())
    }

    pub fn encode(&self, format: ImageFormat, parameters: Option<&str>) -> Result<Vec<u8>> {
        match format {
            ImageFormat::Png => self.encode_png(parameters),
            ImageFormat::Jpeg => self.encode_with(image::ImageFormat::Jpeg),
            ImageFormat::Webp => self.encode_with(image::ImageFormat::WebP),
        }
    }

    pub fn encode_png(&self, parameters: Option<&str>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width, self.height);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            if let Some(p) = parameters {
                enc.add_text_chunk("parameters".to_string(), latin1_safe(p)).map_err(|e| PipelineError::Encode(e.to_string()))?;
            }
            let mut writer = enc.write_header().map_err(|e| PipelineError::Encode(e.to_string()))?;
            writer.write_image_data(&self.rgb).map_err(|e| PipelineError::Encode(e.to_string()))?;
        }
        Ok(out)
    }

    fn encode_with(&self, format: image::ImageFormat) -> Result<Vec<u8>> {
        let img = image::RgbImage::from_raw(self.width, self.height, self.rgb.clone())
            .ok_or_else(|| PipelineError::Encode("pixel buffer does not match the image size".into()))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).map_err(|e| PipelineError::Encode(e.to_string()))?;
        Ok(out.into_inner())
    }
}

/// tEXt chunks are Latin-1; characters outside it are escaped so the chunk stays valid.
fn latin1_safe(s: &str) -> String {
    s.chars().map(|c| if (c as u32) < 256 { c.to_string() } else { format!("\\u{{{:x}}}", c as u32) }).collect()
}

/// The generation parameters in the `parameters` text layout most image tools parse (AUTOMATIC1111's):
/// the prompt, an optional `Negative prompt:` line, then comma-separated `Key: value` pairs.
pub struct ParametersText<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub steps: usize,
    pub scheduler: &'a str,
    pub guidance: f64,
    /// The model's lower scale for its last steps, where its recipe has one ([`crate::LateGuidance`]).
    pub late_guidance: Option<crate::LateGuidance>,
    pub seed: Option<u64>,
    pub width: usize,
    pub height: usize,
    pub model: &'a str,
}

impl std::fmt::Display for ParametersText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.prompt)?;
        if let Some(n) = self.negative_prompt {
            writeln!(f, "Negative prompt: {n}")?;
        }
        write!(f, "Steps: {}, Sampler: {}, CFG scale: {}, ", self.steps, self.scheduler, self.guidance)?;
        if let Some(late) = self.late_guidance {
            write!(f, "Late CFG scale: {} below timestep {}, ", late.scale, late.below_timestep)?;
        }
        if let Some(s) = self.seed {
            write!(f, "Seed: {s}, ")?;
        }
        write!(f, "Size: {}x{}, Model: {}", self.width, self.height, self.model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_carries_parameters_and_round_trips_pixels() {
        let img = GeneratedImage { width: 2, height: 1, rgb: vec![1, 2, 3, 250, 251, 252] };
        let bytes = img.encode_png(Some("a cat\nSteps: 4, Seed: 1")).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut reader = decoder.read_info().unwrap();
        let text = &reader.info().uncompressed_latin1_text;
        assert_eq!(text[0].keyword, "parameters");
        assert!(text[0].text.contains("Seed: 1"));
        let mut buf = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(buf, img.rgb);
    }

    #[test]
    fn jpeg_and_webp_encode() {
        let img = GeneratedImage { width: 8, height: 8, rgb: vec![128; 8 * 8 * 3] };
        assert_eq!(&img.encode(ImageFormat::Jpeg, None).unwrap()[..2], &[0xff, 0xd8]);
        assert_eq!(&img.encode(ImageFormat::Webp, None).unwrap()[..4], b"RIFF");
    }
}
