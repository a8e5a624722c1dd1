//! Reading calibration images: decoded with the `image` crate (PNG and JPEG), turned upright by
//! their EXIF orientation and converted to 8-bit RGB the way transformers does it
//! (`load_image` applies `ImageOps.exif_transpose`; `convert_to_rgb` composites any
//! transparency onto white with Pillow's `alpha_composite`).

use super::resample::Image8;
use anyhow::{bail, Context, Result};
use image::{DynamicImage, ImageDecoder, ImageReader};
use std::path::Path;

/// The file extensions accepted as calibration images (msModelSlim accepts the same).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether a path names an image by its extension.
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Decodes an image file into upright 8-bit RGB.
pub fn load_rgb(path: &Path) -> Result<Image8> {
    let file = || format!("image {}", path.display());
    if !path.is_file() {
        bail!("{}: no such file", file());
    }
    let bytes = std::fs::read(path).with_context(file)?;
    // The content decides the format (as Pillow does), not the extension.
    let format = image::guess_format(&bytes).map_err(|_| {
        anyhow::anyhow!("{}: unsupported or unrecognised image format (PNG and JPEG are supported)", file())
    })?;
    let reader = ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut decoder = reader.into_decoder().with_context(|| format!("{}: cannot decode", file()))?;
    let orientation = decoder.orientation().with_context(|| format!("{}: cannot read its orientation", file()))?;
    let mut img = DynamicImage::from_decoder(decoder).with_context(|| format!("{}: corrupt or truncated", file()))?;
    img.apply_orientation(orientation);
    to_rgb(img).with_context(file)
}

/// Decodes an image held in memory (for tests and embedded data).
pub fn decode_rgb(bytes: &[u8]) -> Result<Image8> {
    let img = image::load_from_memory(bytes).context("cannot decode image bytes")?;
    to_rgb(img)
}

fn to_rgb(img: DynamicImage) -> Result<Image8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("the image is empty ({w}x{h})");
    }
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageRgba8(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| over_white(p[..3].try_into().unwrap(), p[3])).collect()
        }
        DynamicImage::ImageLumaA8(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| over_white([p[0]; 3], p[1])).collect()
        }
        // Pillow reads 16-bit PNG colour channels by their high byte.
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| over_white([(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8], (p[3] >> 8) as u8))
            .collect(),
        other => bail!("unsupported pixel layout {:?}", other.color()),
    };
    Ok(Image8::new(w, h, 3, data))
}

/// Pillow's `alpha_composite(white, rgba)` for one pixel (AlphaComposite.c, 7 extra bits of
/// precision, divisions by 255 done with shifts). With an opaque white background the
/// coefficients reduce to `a * 128` and `(255 - a) * 128`.
fn over_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    if a == 0 {
        return [255; 3];
    }
    const BITS: u32 = 7;
    let a = a as u32;
    let out_a255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << BITS) / out_a255;
    let coef2 = 255 * (1 << BITS) - coef1;
    let div255 = |v: u32| ((v >> 8) + v) >> 8;
    rgb.map(|s| (div255(s as u32 * coef1 + 255 * coef2 + (0x80 << BITS)) >> BITS) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compositing_onto_white_matches_the_exact_blend() {
        // Opaque keeps the colour, transparent gives white, and in between the integer blend
        // stays within one level of the exact s*a/255 + 255*(1 - a/255).
        assert_eq!(over_white([10, 20, 30], 255), [10, 20, 30]);
        assert_eq!(over_white([10, 20, 30], 0), [255, 255, 255]);
        for a in 0..=255u32 {
            for s in [0u32, 1, 77, 128, 200, 255] {
                let exact = (s * a) as f64 / 255.0 + 255.0 * (1.0 - a as f64 / 255.0);
                let got = over_white([s as u8; 3], a as u8)[0] as f64;
                assert!((got - exact).abs() <= 1.0, "s={s} a={a}: {got} vs {exact}");
            }
        }
    }

    #[test]
    fn grayscale_and_alpha_pngs_become_rgb() {
        let mut bytes = Vec::new();
        let gray = image::GrayAlphaImage::from_raw(2, 1, vec![100, 255, 100, 0]).unwrap();
        DynamicImage::ImageLumaA8(gray)
            .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        let img = decode_rgb(&bytes).unwrap();
        assert_eq!((img.width, img.height, img.channels), (2, 1, 3));
        assert_eq!(img.data, vec![100, 100, 100, 255, 255, 255]);
    }

    #[test]
    fn missing_corrupt_and_unsupported_files_are_named() {
        let dir = std::env::temp_dir().join(format!("lamina-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("nope.png");
        let err = format!("{:#}", load_rgb(&missing).unwrap_err());
        assert!(err.contains("nope.png") && err.contains("no such file"), "{err}");

        let corrupt = dir.join("corrupt.png");
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(image::RgbImage::new(8, 8))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(&corrupt, &png[..png.len() / 2]).unwrap();
        let err = format!("{:#}", load_rgb(&corrupt).unwrap_err());
        assert!(err.contains("corrupt.png"), "{err}");

        let text = dir.join("notes.png");
        std::fs::write(&text, b"this is not an image").unwrap();
        let err = format!("{:#}", load_rgb(&text).unwrap_err());
        assert!(err.contains("notes.png") && err.contains("unsupported"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
