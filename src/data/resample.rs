//! Image resizing exactly as Pillow's `Image.resize` does it for 8-bit images, because that is
//! what transformers' image processors call: a separable convolution (horizontal pass, then
//! vertical), the filter's support widened by the scale factor when shrinking (antialiasing),
//! coefficients in 22-bit fixed point, and each pass rounded and clipped to u8 before the next.
//! Reference: Pillow's `src/libImaging/Resample.c` (`precompute_coeffs`,
//! `normalize_coeffs_8bpc`, `ImagingResampleHorizontal_8bpc` / `Vertical_8bpc`) and
//! `Image.resize` in `src/PIL/Image.py`.

use anyhow::{bail, Result};

/// Pillow's resampling filters, by the numbers that `preprocessor_config.json` stores in
/// `resample` (`PIL.Image.Resampling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Filter {
    /// The filter for a `resample` code. NEAREST (0) takes another code path in Pillow (an
    /// affine transform) that no supported processor uses, so it is refused.
    pub fn from_pil(code: u64) -> Result<Filter> {
        Ok(match code {
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            0 => bail!("resample 0 (NEAREST) is not supported; use 2 (BILINEAR) or 3 (BICUBIC)"),
            other => bail!("resample {other} is not a Pillow resampling filter (0..=5)"),
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes the constants as C floats (0.54f, 0.46f).
                    x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
                }
            }
            Filter::Bicubic => {
                // Keys' cubic convolution with a = -0.5.
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of the 8-bit coefficients (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For every output pixel along one axis: the first input pixel it reads and its integer weights.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`, for the whole input range.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    // Pillow computes `in1 - in0` in single precision from the float box; exact for sizes < 2^24.
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let inv_filterscale = 1.0 / filterscale;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero; negative starts are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> =
            (0..count).map(|x| filter.eval((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale)).collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            k.iter_mut().for_each(|w| *w /= total);
        }
        let fixed = k
            .iter()
            .map(|&w| {
                let v = w * (1u32 << PRECISION_BITS) as f64;
                (if w < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        first.push(xmin);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

/// `clip8`: drop the fixed-point fraction (an arithmetic shift, so negatives floor) and clamp.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// An 8-bit image with interleaved channels, rows top to bottom (`[height, width, channels]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image8 {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Image8 {
        debug_assert_eq!(data.len(), width * height * channels);
        Image8 { width, height, channels, data }
    }

    pub fn pixel(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

fn resample_horizontal(img: &Image8, out_width: usize, filter: Filter) -> Image8 {
    let co = coefficients(img.width, out_width, filter);
    let ch = img.channels;
    let mut out = vec![0u8; out_width * img.height * ch];
    for y in 0..img.height {
        let row = &img.data[y * img.width * ch..(y + 1) * img.width * ch];
        for xx in 0..out_width {
            let (x0, k) = (co.first[xx], &co.weights[xx]);
            for c in 0..ch {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += row[(x0 + i) * ch + c] as i32 * w;
                }
                out[(y * out_width + xx) * ch + c] = clip8(acc);
            }
        }
    }
    Image8::new(out_width, img.height, ch, out)
}

fn resample_vertical(img: &Image8, out_height: usize, filter: Filter) -> Image8 {
    let co = coefficients(img.height, out_height, filter);
    let stride = img.width * img.channels;
    let mut out = vec![0u8; stride * out_height];
    for yy in 0..out_height {
        let (y0, k) = (co.first[yy], &co.weights[yy]);
        for i in 0..stride {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (j, &w) in k.iter().enumerate() {
                acc += img.data[(y0 + j) * stride + i] as i32 * w;
            }
            out[yy * stride + i] = clip8(acc);
        }
    }
    Image8::new(img.width, out_height, img.channels, out)
}

/// `PIL.Image.resize((width, height), filter)` on an 8-bit image.
pub fn resize(img: &Image8, width: usize, height: usize, filter: Filter) -> Result<Image8> {
    if width == 0 || height == 0 {
        bail!("cannot resize a {}x{} image to {width}x{height}", img.width, img.height);
    }
    if img.width == 0 || img.height == 0 {
        bail!("cannot resize an empty {}x{} image", img.width, img.height);
    }
    // Pillow passes are skipped when their axis keeps its size (no rounding happens then).
    let horizontal = |i: &Image8| if i.width != width { resample_horizontal(i, width, filter) } else { i.clone() };
    let vertical = |i: &Image8| if i.height != height { resample_vertical(i, height, filter) } else { i.clone() };
    // Image.resize shrinks very tall images vertically first (then horizontally).
    if img.height > img.width * 100 && height < img.height {
        Ok(horizontal(&vertical(img)))
    } else {
        Ok(vertical(&horizontal(img)))
    }
}

/// Antialiased resize as torchvision does it for transformers' "fast" image processors
/// (`torchvision.transforms.v2.functional.resize(..., antialias=True)` on a uint8 tensor, which on
/// x86 CPUs runs PyTorch's native uint8 kernel, `upsample_avx_bilinear_bicubic_uint8`). It is
/// Pillow's algorithm with other fixed-point weights: computed in f64 with PyTorch's formulas,
/// then quantized to i16 with as many fraction bits as the largest weight allows (at most 22);
/// horizontal pass then vertical, each rounded and clipped to u8. Reference: PyTorch's
/// `aten/src/ATen/native/cpu/UpSampleKernel.cpp` (`_compute_index_ranges_int16_weights`) and
/// `UpSampleKernelAVXAntialias.h`. Only bilinear and bicubic have antialiased kernels there.
pub fn resize_torchvision(img: &Image8, width: usize, height: usize, filter: Filter) -> Result<Image8> {
    if width == 0 || height == 0 || img.width == 0 || img.height == 0 {
        bail!("cannot resize a {}x{} image to {width}x{height}", img.width, img.height);
    }
    if !matches!(filter, Filter::Bicubic | Filter::Bilinear) {
        bail!("torchvision's antialiased resize supports bilinear and bicubic, not {filter:?}");
    }
    let mut out = img.clone();
    if width != out.width {
        let co = torch_coefficients(out.width, width, filter);
        out = convolve_horizontal(&out, &co);
    }
    if height != out.height {
        let co = torch_coefficients(out.height, height, filter);
        out = convolve_vertical(&out, &co);
    }
    Ok(out)
}

/// Fixed-point weights with `bits` fraction bits, per output pixel along one axis.
struct FixedCoefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
    bits: u32,
}

fn convolve_horizontal(img: &Image8, co: &FixedCoefficients) -> Image8 {
    let (ch, out_width) = (img.channels, co.first.len());
    let mut out = vec![0u8; out_width * img.height * ch];
    for y in 0..img.height {
        let row = &img.data[y * img.width * ch..(y + 1) * img.width * ch];
        for xx in 0..out_width {
            let (x0, k) = (co.first[xx], &co.weights[xx]);
            for c in 0..ch {
                let acc = k
                    .iter()
                    .enumerate()
                    .fold(1i32 << (co.bits - 1), |a, (i, &w)| a + row[(x0 + i) * ch + c] as i32 * w);
                out[(y * out_width + xx) * ch + c] = (acc >> co.bits).clamp(0, 255) as u8;
            }
        }
    }
    Image8::new(out_width, img.height, ch, out)
}

fn convolve_vertical(img: &Image8, co: &FixedCoefficients) -> Image8 {
    let (stride, out_height) = (img.width * img.channels, co.first.len());
    let mut out = vec![0u8; stride * out_height];
    for yy in 0..out_height {
        let (y0, k) = (co.first[yy], &co.weights[yy]);
        for i in 0..stride {
            let acc = k
                .iter()
                .enumerate()
                .fold(1i32 << (co.bits - 1), |a, (j, &w)| a + img.data[(y0 + j) * stride + i] as i32 * w);
            out[yy * stride + i] = (acc >> co.bits).clamp(0, 255) as u8;
        }
    }
    Image8::new(img.width, out_height, img.channels, out)
}

/// PyTorch's antialiased weights in f64 (`_compute_weights_aa`), quantized to i16.
fn torch_coefficients(in_size: usize, out_size: usize, filter: Filter) -> FixedCoefficients {
    let scale = in_size as f64 / out_size as f64;
    let half_width = if filter == Filter::Bicubic { 2.0 } else { 1.0 };
    let support = if scale >= 1.0 { half_width * scale } else { half_width };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let kernel = |x: f64| -> f64 {
        let x = x.abs();
        match filter {
            Filter::Bicubic => {
                // PyTorch's spelling of Keys' kernel (a = -0.5); it rounds a little differently
                // from Pillow's.
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
                } else {
                    0.0
                }
            }
            _ => (1.0 - x).max(0.0),
        }
    };
    let mut first = Vec::with_capacity(out_size);
    let mut real = Vec::with_capacity(out_size);
    let mut largest = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xsize = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let mut k: Vec<f64> =
            (0..xsize.max(0)).map(|j| kernel(((j + xmin) as f64 - center + 0.5) * invscale)).collect();
        let total: f64 = k.iter().sum();
        if total != 0.0 {
            k.iter_mut().for_each(|w| *w /= total);
            largest = k.iter().fold(largest, |m, &w| m.max(w));
        }
        first.push(xmin as usize);
        real.push(k);
    }
    // As many fraction bits as keep the largest weight within an i16.
    let mut bits = 0u32;
    while bits < 22 && ((0.5 + largest * (1u64 << (bits + 1)) as f64) as i64) < (1 << 15) {
        bits += 1;
    }
    let weights = real
        .iter()
        .map(|k| {
            k.iter()
                .map(|&w| {
                    let v = w * (1u64 << bits) as f64;
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect()
        })
        .collect();
    FixedCoefficients { first, weights, bits }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resize is a weighted average: on a constant image every filter returns the constant.
    #[test]
    fn constant_image_stays_constant() {
        let img = Image8::new(37, 23, 3, vec![77; 37 * 23 * 3]);
        for f in [Filter::Bicubic, Filter::Bilinear, Filter::Lanczos, Filter::Box, Filter::Hamming] {
            for (w, h) in [(10, 9), (80, 50), (37, 5)] {
                let out = resize(&img, w, h, f).unwrap();
                assert_eq!((out.width, out.height), (w, h));
                assert!(out.data.iter().all(|&v| v == 77), "{f:?} {w}x{h}");
            }
        }
    }

    /// Box filtering by an integer factor is the plain block mean (rounded half up), which can
    /// be written down independently of the fixed-point machinery.
    #[test]
    fn box_downscale_by_two_is_block_mean() {
        let (w, h) = (8, 6);
        let data: Vec<u8> = (0..w * h).map(|i| ((i * 37) % 256) as u8).collect();
        let img = Image8::new(w, h, 1, data);
        let out = resize(&img, w / 2, h / 2, Filter::Box).unwrap();
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                let horiz = |yy: usize| {
                    let s = img.pixel(2 * x, yy, 0) as u32 + img.pixel(2 * x + 1, yy, 0) as u32;
                    s.div_ceil(2) // the first pass rounds halves up to u8
                };
                let expect = (horiz(2 * y) + horiz(2 * y + 1)).div_ceil(2);
                assert_eq!(out.pixel(x, y, 0) as u32, expect, "({x},{y})");
            }
        }
    }

    #[test]
    fn bicubic_weights_follow_keys_kernel() {
        // Upscaling by 2: output pixel 2 is centered at 1.25 in input space, between inputs 0..4.
        let co = coefficients(4, 8, Filter::Bicubic);
        let k: Vec<f64> = co.weights[2].iter().map(|&w| w as f64 / (1 << PRECISION_BITS) as f64).collect();
        let keys = |t: f64| {
            let t = t.abs();
            if t < 1.0 {
                1.5 * t.powi(3) - 2.5 * t * t + 1.0
            } else if t < 2.0 {
                -0.5 * t.powi(3) + 2.5 * t * t - 4.0 * t + 2.0
            } else {
                0.0
            }
        };
        let center = 1.25;
        // The tap left of pixel 0 falls outside the image, so the kept taps are renormalized.
        let raw: Vec<f64> = (co.first[2]..co.first[2] + k.len()).map(|i| keys(i as f64 + 0.5 - center)).collect();
        let sum: f64 = raw.iter().sum();
        let expect: Vec<f64> = raw.iter().map(|w| w / sum).collect();
        assert_eq!(k.len(), 3);
        for (a, b) in k.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-6, "{k:?} vs {expect:?}");
        }
    }

    #[test]
    fn refuses_nearest_and_unknown_codes() {
        assert!(Filter::from_pil(0).is_err());
        assert!(Filter::from_pil(9).is_err());
        assert_eq!(Filter::from_pil(3).unwrap(), Filter::Bicubic);
    }
}
