//! The image processors of the supported families, reproducing transformers' PIL-backed
//! processors (`Qwen2VLImageProcessor`, `CLIPImageProcessor`) step by step, with every parameter
//! read from the model's `preprocessor_config.json`:
//!
//! - Qwen2-VL / Qwen2.5-VL / Qwen3-VL: `smart_resize` to multiples of `patch_size * merge_size`
//!   within `[min_pixels, max_pixels]`, resize, rescale, normalize, repeat the frame
//!   `temporal_patch_size` times and flatten into patches `[grid_t*grid_h*grid_w, C*T*P*P]`
//!   ordered by merge window, plus `image_grid_thw`.
//! - GLM-4.1V / 4.5V / 4.6V (`Glm4vImageProcessor`): the same patches, with GLM's `smart_resize`
//!   ([`glm4v_smart_resize`]: the pixel budget counts the `temporal_patch_size` frames, images
//!   smaller than a merged patch are first scaled up to one).
//! - LLaVA (CLIP): resize the shortest edge, center crop, rescale, normalize: `[1, 3, H, W]`.
//! - InternVL (`internvl_chat`): the remote code's dynamic tiling (see [`InternVlProcessor`]):
//!   `[tiles, 3, S, S]`, with its settings from config.json.
//! - Qwen-VL (`qwen` with a `visual` section): visual.py's `image_transform`, the whole image
//!   resized to `visual.image_size` square with Pillow's bicubic, ToTensor, CLIP-normalised:
//!   `[1, 3, S, S]` (InternVL's processor with one tile, see [`InternVlProcessor::qwen_vl`]).
//!
//! transformers has two implementations of each processor, and which one runs matters at the
//! level of single pixel values: the PIL/numpy one ("slow": Pillow's fixed-point resize, rescale
//! in f64 then normalize in f32) and the torchvision one ("fast": PyTorch's f32 antialiased
//! resize rounded back to u8, rescale folded into mean and std). transformers 4.x runs the fast
//! one when `image_processor_type` names it (`...Fast`, as the Qwen3-VL releases do) and the
//! slow one otherwise (Qwen2-VL, Qwen2.5-VL, LLaVA 1.5 releases); [`Backend`] follows that rule.

use super::resample::{self, Filter, Image8};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::Path;

/// `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`: the defaults of both processors.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Which of transformers' implementations a processor reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The PIL/numpy processors (`Qwen2VLImageProcessor` in transformers 4.x).
    Pillow,
    /// The torchvision processors (`Qwen2VLImageProcessorFast`).
    Torchvision,
}

impl Backend {
    /// The backend a `preprocessor_config.json` asks for through its `image_processor_type`.
    pub fn from_json(json: &Value) -> Backend {
        match json.get("image_processor_type").and_then(Value::as_str) {
            Some(t) if t.ends_with("Fast") => Backend::Torchvision,
            _ => Backend::Pillow,
        }
    }

    fn resize(self, img: &Image8, width: usize, height: usize, filter: Filter) -> Result<Image8> {
        match self {
            Backend::Pillow => resample::resize(img, width, height, filter),
            Backend::Torchvision => resample::resize_torchvision(img, width, height, filter),
        }
    }
}

/// Rescale and normalize settings shared by the processors.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl Normalize {
    /// Channel-first f32 planes `[3, H, W]` of an RGB image, rescaled and normalized.
    fn planes(&self, img: &Image8, backend: Backend) -> Vec<f32> {
        let (w, h) = (img.width, img.height);
        let mut out = vec![0f32; 3 * w * h];
        for c in 0..3 {
            let (mean, std) = (self.mean[c] as f32, self.std[c] as f32);
            // torchvision folds the rescale into mean and std: (v - mean/r) / (std/r), in f32.
            let inv = (1.0 / self.rescale_factor) as f32;
            let (fused_mean, fused_std) = (mean * inv, std * inv);
            for i in 0..w * h {
                let v = img.data[i * 3 + c];
                out[c * w * h + i] = match (backend, self.do_rescale, self.do_normalize) {
                    (Backend::Pillow, true, norm) => {
                        let x = (v as f64 * self.rescale_factor) as f32;
                        if norm {
                            (x - mean) / std
                        } else {
                            x
                        }
                    }
                    (Backend::Torchvision, true, true) => (v as f32 - fused_mean) / fused_std,
                    (Backend::Torchvision, true, false) => v as f32 * self.rescale_factor as f32,
                    (_, false, true) => (v as f32 - mean) / std,
                    (_, false, false) => v as f32,
                };
            }
        }
        out
    }
}

/// Whose `smart_resize` a patch processor follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeRule {
    /// Qwen2-VL's (also Qwen2.5-VL and Qwen3-VL): [`smart_resize`].
    Qwen,
    /// GLM-4.1V's: [`glm4v_smart_resize`].
    Glm4v,
}

/// `Qwen2VLImageProcessor` settings (also used by Qwen2.5-VL and Qwen3-VL), and
/// `Glm4vImageProcessor`'s, which differ only in [`ResizeRule`].
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlProcessor {
    pub resize: ResizeRule,
    pub backend: Backend,
    pub do_resize: bool,
    pub filter: Filter,
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub normalize: Normalize,
}

/// `CLIPImageProcessor` settings (LLaVA).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipProcessor {
    pub backend: Backend,
    pub do_resize: bool,
    pub filter: Filter,
    pub size: ClipSize,
    /// `(height, width)` of the center crop, when `do_center_crop`.
    pub crop: Option<(usize, usize)>,
    pub normalize: Normalize,
}

/// CLIP's `size`: the shortest edge (aspect kept) or a fixed height and width.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipSize {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

/// A model's image processor.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageProcessor {
    QwenVl(QwenVlProcessor),
    Clip(ClipProcessor),
    InternVl(InternVlProcessor),
    /// Qwen-VL: the image resized to one square tile ([`InternVlProcessor::qwen_vl`]).
    QwenVlResize(InternVlProcessor),
}

/// An image turned into model inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// Qwen: `[grid_t*grid_h*grid_w, C*T*P*P]`; CLIP: `[1, 3, H, W]`; InternVL: `[tiles, 3, S, S]`.
    pub shape: Vec<usize>,
    pub pixel_values: Vec<f32>,
    /// Qwen only: `[grid_t, grid_h, grid_w]` in patches.
    pub grid_thw: Option<[usize; 3]>,
}

/// The image processor family of a `model_type`, if it has one.
pub fn family_of(model_type: &str) -> Option<&'static str> {
    match model_type {
        "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" => Some("qwen_vl"),
        "llava" => Some("clip"),
        "internvl_chat" => Some("internvl"),
        // transformers' `-hf` InternVL conversions: GotOcr2ImageProcessor with `crop_to_patches`.
        "internvl" => Some("got_ocr2"),
        "glm4v" | "glm4v_moe" => Some("glm4v"),
        _ => None,
    }
}

impl ImageProcessor {
    /// Reads the processor of a model folder: `preprocessor_config.json` (or the
    /// `image_processor` object of `processor_config.json`), the family chosen by
    /// `config.json`'s `model_type`.
    pub fn load(model_dir: &Path) -> Result<ImageProcessor> {
        let config_path = model_dir.join("config.json");
        let config = read_json(&config_path)?;
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        if config.get("visual").is_some_and(Value::is_object) {
            // Qwen-VL has no preprocessor_config.json: visual.py builds its transform from config.json.
            return InternVlProcessor::qwen_vl(&config)
                .with_context(|| config_path.display().to_string())
                .map(ImageProcessor::QwenVlResize);
        }
        if family_of(model_type) == Some("internvl") {
            // The chat scripts tile by config.json; preprocessor_config.json (when present) only
            // confirms the mean and std.
            let pre = read_processor_json(model_dir).ok().map(|(_, j)| j);
            return InternVlProcessor::from_config(&config, pre.as_ref())
                .with_context(|| config_path.display().to_string())
                .map(ImageProcessor::InternVl);
        }
        let (path, json) = read_processor_json(model_dir)?;
        let what = path.display().to_string();
        match family_of(model_type) {
            Some("qwen_vl") => {
                Ok(ImageProcessor::QwenVl(QwenVlProcessor::from_json(&json).with_context(|| what.clone())?))
            }
            Some("glm4v") => {
                Ok(ImageProcessor::QwenVl(QwenVlProcessor::glm4v_from_json(&json).with_context(|| what.clone())?))
            }
            Some("got_ocr2") => Ok(ImageProcessor::InternVl(
                InternVlProcessor::got_ocr2_from_json(&json).with_context(|| what.clone())?,
            )),
            Some(_) => Ok(ImageProcessor::Clip(ClipProcessor::from_json(&json).with_context(|| what.clone())?)),
            None => {
                let kind = json.get("image_processor_type").and_then(Value::as_str).unwrap_or("");
                if kind.starts_with("Glm4v") {
                    Ok(ImageProcessor::QwenVl(QwenVlProcessor::glm4v_from_json(&json).with_context(|| what.clone())?))
                } else if kind.starts_with("Qwen2VL") || kind.starts_with("Qwen2_5_VL") {
                    Ok(ImageProcessor::QwenVl(QwenVlProcessor::from_json(&json).with_context(|| what.clone())?))
                } else if kind.starts_with("CLIP") {
                    Ok(ImageProcessor::Clip(ClipProcessor::from_json(&json).with_context(|| what.clone())?))
                } else {
                    bail!(
                        "{}: model_type {model_type:?} has no supported image processor (image_processor_type {kind:?})",
                        config_path.display()
                    )
                }
            }
        }
    }

    /// Runs the processor on an RGB image.
    pub fn process(&self, img: &Image8) -> Result<ProcessedImage> {
        match self {
            ImageProcessor::QwenVl(p) => p.process(img),
            ImageProcessor::Clip(p) => p.process(img),
            ImageProcessor::InternVl(p) | ImageProcessor::QwenVlResize(p) => p.process(img),
        }
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn read_processor_json(model_dir: &Path) -> Result<(std::path::PathBuf, Value)> {
    let pre = model_dir.join("preprocessor_config.json");
    if pre.is_file() {
        return Ok((pre.clone(), read_json(&pre)?));
    }
    let combined = model_dir.join("processor_config.json");
    if combined.is_file() {
        if let Some(v) = read_json(&combined)?.get("image_processor").filter(|v| v.is_object()) {
            return Ok((combined, v.clone()));
        }
    }
    bail!("{}: missing (the model folder has no image processor settings)", pre.display())
}

fn opt_usize(json: &Value, key: &str) -> Result<Option<usize>> {
    match json.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => {
            v.as_u64().map(|x| Some(x as usize)).with_context(|| format!("{key} is {v}, not a non-negative integer"))
        }
    }
}

fn opt_f64(json: &Value, key: &str) -> Result<Option<f64>> {
    match json.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).with_context(|| format!("{key} is {v}, not a number")),
    }
}

fn flag(json: &Value, key: &str, default: bool) -> Result<bool> {
    match json.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(v) => v.as_bool().with_context(|| format!("{key} is {v}, not true or false")),
    }
}

fn triple(json: &Value, key: &str, default: [f64; 3]) -> Result<[f64; 3]> {
    match json.get(key).filter(|v| !v.is_null()) {
        None => Ok(default),
        Some(Value::Number(n)) => Ok([n.as_f64().unwrap(); 3]),
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().with_context(|| format!("{key} holds {x}, not a number"))?;
            }
            Ok(out)
        }
        Some(v) => bail!("{key} is {v}, not a number or a list of 3 numbers"),
    }
}

fn normalize_from_json(json: &Value) -> Result<Normalize> {
    let n = Normalize {
        do_rescale: flag(json, "do_rescale", true)?,
        rescale_factor: opt_f64(json, "rescale_factor")?.unwrap_or(1.0 / 255.0),
        do_normalize: flag(json, "do_normalize", true)?,
        mean: triple(json, "image_mean", CLIP_MEAN)?,
        std: triple(json, "image_std", CLIP_STD)?,
    };
    if n.do_normalize && n.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        bail!("image_std {:?} must be finite and non-zero", n.std);
    }
    Ok(n)
}

fn filter_from_json(json: &Value) -> Result<Filter> {
    Filter::from_pil(opt_usize(json, "resample")?.unwrap_or(3) as u64).context("resample")
}

impl QwenVlProcessor {
    /// Reads the settings with `Qwen2VLImageProcessor`'s defaults. `min_pixels` / `max_pixels`
    /// take precedence over `size.shortest_edge` / `size.longest_edge`, as in transformers.
    pub fn from_json(json: &Value) -> Result<QwenVlProcessor> {
        Self::read(json, ResizeRule::Qwen, (56 * 56, 28 * 28 * 1280))
    }

    /// `Glm4vImageProcessor`'s settings and defaults (`size` 112² to 28²·15000 pixels, counted
    /// over the `temporal_patch_size` frames).
    pub fn glm4v_from_json(json: &Value) -> Result<QwenVlProcessor> {
        Self::read(json, ResizeRule::Glm4v, (112 * 112, 28 * 28 * 15000))
    }

    fn read(json: &Value, resize: ResizeRule, (default_min, default_max): (usize, usize)) -> Result<QwenVlProcessor> {
        let size = json.get("size").filter(|v| v.is_object());
        let from_size = |keys: &[&str]| -> Result<Option<usize>> {
            for k in keys {
                if let Some(v) = size.map(|s| opt_usize(s, k)).transpose()?.flatten() {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        };
        let min_pixels = match opt_usize(json, "min_pixels")? {
            Some(v) => v,
            None => from_size(&["shortest_edge", "min_pixels"])?.unwrap_or(default_min),
        };
        let max_pixels = match opt_usize(json, "max_pixels")? {
            Some(v) => v,
            None => from_size(&["longest_edge", "max_pixels"])?.unwrap_or(default_max),
        };
        let p = QwenVlProcessor {
            resize,
            backend: Backend::from_json(json),
            do_resize: flag(json, "do_resize", true)?,
            filter: filter_from_json(json)?,
            min_pixels,
            max_pixels,
            patch_size: opt_usize(json, "patch_size")?.unwrap_or(14),
            merge_size: opt_usize(json, "merge_size")?.unwrap_or(2),
            temporal_patch_size: opt_usize(json, "temporal_patch_size")?.unwrap_or(2),
            normalize: normalize_from_json(json)?,
        };
        if p.patch_size == 0 || p.merge_size == 0 || p.temporal_patch_size == 0 {
            bail!("patch_size, merge_size and temporal_patch_size must be positive");
        }
        if p.min_pixels > p.max_pixels {
            bail!("min_pixels {} is larger than max_pixels {}", p.min_pixels, p.max_pixels);
        }
        Ok(p)
    }

    /// The `(height, width)` the processor resizes an image to.
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if !self.do_resize {
            return Ok((height, width));
        }
        let factor = self.patch_size * self.merge_size;
        match self.resize {
            ResizeRule::Qwen => smart_resize(height, width, factor, self.min_pixels, self.max_pixels),
            ResizeRule::Glm4v => glm4v_smart_resize(
                self.temporal_patch_size,
                height,
                width,
                self.temporal_patch_size,
                factor,
                self.min_pixels,
                self.max_pixels,
            ),
        }
    }

    /// The number of image tokens the language model sees for an image of this grid.
    pub fn num_image_tokens(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw.iter().product::<usize>() / (self.merge_size * self.merge_size)
    }

    pub fn process(&self, img: &Image8) -> Result<ProcessedImage> {
        let (h, w) = self.target_size(img.height, img.width)?;
        let factor = self.patch_size * self.merge_size;
        if h % factor != 0 || w % factor != 0 {
            bail!("a {}x{} image is not a multiple of patch_size*merge_size = {factor} and do_resize is off", w, h);
        }
        let resized;
        let img = if (h, w) != (img.height, img.width) {
            resized = self.backend.resize(img, w, h, self.filter)?;
            &resized
        } else {
            img
        };
        let planes = self.normalize.planes(img, self.backend);
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let row_len = 3 * t * p * p;
        let mut out = Vec::with_capacity(gh * gw * row_len);
        // Rows go merge window by merge window (bh, bw), then within the window (mh, mw); each
        // row holds channel, then the repeated frame, then the patch's pixels row-major.
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            let plane = &planes[c * h * w..(c + 1) * h * w];
                            for _ in 0..t {
                                for y in y0..y0 + p {
                                    out.extend_from_slice(&plane[y * w + x0..y * w + x0 + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(ProcessedImage { shape: vec![gh * gw, row_len], pixel_values: out, grid_thw: Some([1, gh, gw]) })
    }
}

/// transformers' `smart_resize`: the `(height, width)` closest in aspect to the input whose
/// sides are multiples of `factor` and whose area lies in `[min_pixels, max_pixels]`.
/// Python's `round` rounds halves to even.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        bail!("cannot resize an empty {width}x{height} image");
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > 200.0 {
        bail!("a {width}x{height} image has an aspect ratio of {ratio:.1}; the processor accepts at most 200");
    }
    let mut h_bar = (hf / ff).round_ties_even() as usize * factor;
    let mut w_bar = (wf / ff).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        h_bar = factor.max((hf / beta / ff).floor() as usize * factor);
        w_bar = factor.max((wf / beta / ff).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = (hf * beta / ff).ceil() as usize * factor;
        w_bar = (wf * beta / ff).ceil() as usize * factor;
    }
    Ok((h_bar, w_bar))
}

/// GLM-4.1V's `smart_resize` (`image_processing_glm4v.py`) for `num_frames` frames: a side
/// shorter than `factor` first scales the image up (sides truncated to integers), then the sides
/// round to multiples of `factor` (halves to even) and the frames to a multiple of
/// `temporal_factor`; when `frames × height × width` leaves `[min_pixels, max_pixels]`, both sides
/// scale by the square root of the excess, floored (down) or ceiled (up) to multiples of `factor`.
pub fn glm4v_smart_resize(
    num_frames: usize,
    height: usize,
    width: usize,
    temporal_factor: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    ensure!(height > 0 && width > 0, "cannot resize an empty {width}x{height} image");
    ensure!(
        num_frames >= temporal_factor && temporal_factor > 0,
        "{num_frames} frames are fewer than the temporal patch size {temporal_factor}"
    );
    let (mut hf, mut wf, ff) = (height as f64, width as f64, factor as f64);
    if height < factor || width < factor {
        let scale = (ff / hf).max(ff / wf);
        hf = (hf * scale).trunc();
        wf = (wf * scale).trunc();
    }
    let ratio = hf.max(wf) / hf.min(wf);
    ensure!(
        ratio <= 200.0,
        "a {width}x{height} image has an aspect ratio of {ratio:.1}; the processor accepts at most 200"
    );
    let frames = num_frames as f64;
    let mut h_bar = (hf / ff).round_ties_even() * ff;
    let mut w_bar = (wf / ff).round_ties_even() * ff;
    let t_bar = (frames / temporal_factor as f64).round_ties_even() * temporal_factor as f64;
    if t_bar * h_bar * w_bar > max_pixels as f64 {
        let beta = (frames * hf * wf / max_pixels as f64).sqrt();
        h_bar = ff.max((hf / beta / ff).floor() * ff);
        w_bar = ff.max((wf / beta / ff).floor() * ff);
    } else if t_bar * h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (frames * hf * wf)).sqrt();
        h_bar = (hf * beta / ff).ceil() * ff;
        w_bar = (wf * beta / ff).ceil() * ff;
    }
    Ok((h_bar as usize, w_bar as usize))
}

fn dict_or_int(json: &Value, key: &str) -> Option<Value> {
    json.get(key).filter(|v| !v.is_null()).cloned()
}

impl ClipProcessor {
    /// Reads the settings with `CLIPImageProcessor`'s defaults (shortest edge 224, crop 224).
    pub fn from_json(json: &Value) -> Result<ClipProcessor> {
        let size = match dict_or_int(json, "size") {
            None => ClipSize::ShortestEdge(224),
            Some(Value::Number(n)) => ClipSize::ShortestEdge(n.as_u64().context("size is not an integer")? as usize),
            Some(v @ Value::Object(_)) => {
                if let Some(s) = opt_usize(&v, "shortest_edge")? {
                    ClipSize::ShortestEdge(s)
                } else {
                    let height = opt_usize(&v, "height")?.context("size has neither shortest_edge nor height")?;
                    let width = opt_usize(&v, "width")?.context("size has no width")?;
                    ClipSize::Exact { height, width }
                }
            }
            Some(v) => bail!("size is {v}, not an integer or an object"),
        };
        let crop = if flag(json, "do_center_crop", true)? {
            Some(match dict_or_int(json, "crop_size") {
                None => (224, 224),
                Some(Value::Number(n)) => {
                    let s = n.as_u64().context("crop_size is not an integer")? as usize;
                    (s, s)
                }
                Some(v @ Value::Object(_)) => (
                    opt_usize(&v, "height")?.context("crop_size has no height")?,
                    opt_usize(&v, "width")?.context("crop_size has no width")?,
                ),
                Some(v) => bail!("crop_size is {v}, not an integer or an object"),
            })
        } else {
            None
        };
        Ok(ClipProcessor {
            backend: Backend::from_json(json),
            do_resize: flag(json, "do_resize", true)?,
            filter: filter_from_json(json)?,
            size,
            crop,
            normalize: normalize_from_json(json)?,
        })
    }

    /// The `(height, width)` after the resize step (`get_resize_output_image_size` with
    /// `default_to_square=False`: the long side is truncated, not rounded).
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        if !self.do_resize {
            return (height, width);
        }
        match self.size {
            ClipSize::Exact { height, width } => (height, width),
            ClipSize::ShortestEdge(s) => {
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// The `(height, width)` of `pixel_values` for an input of this size.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.crop.unwrap_or_else(|| self.resized_size(height, width))
    }

    pub fn process(&self, img: &Image8) -> Result<ProcessedImage> {
        let (h, w) = self.resized_size(img.height, img.width);
        if h == 0 || w == 0 {
            bail!("a {}x{} image would be resized to {w}x{h}", img.width, img.height);
        }
        let resized;
        let mut img = if (h, w) != (img.height, img.width) {
            resized = self.backend.resize(img, w, h, self.filter)?;
            &resized
        } else {
            img
        };
        let cropped;
        if let Some((ch, cw)) = self.crop {
            cropped = center_crop(img, ch, cw, self.backend);
            img = &cropped;
        }
        let planes = self.normalize.planes(img, self.backend);
        Ok(ProcessedImage { shape: vec![1, 3, img.height, img.width], pixel_values: planes, grid_thw: None })
    }
}

/// transformers' `center_crop`: offsets `(size - crop) // 2`; an image smaller than the crop is
/// first padded with zeros, centered (the odd pixel of padding goes before with numpy, after
/// with torchvision).
fn center_crop(img: &Image8, crop_h: usize, crop_w: usize, backend: Backend) -> Image8 {
    let (h, w, ch) = (img.height, img.width, img.channels);
    let (new_h, new_w) = (crop_h.max(h), crop_w.max(w));
    let half = |pad: usize| if backend == Backend::Pillow { pad.div_ceil(2) } else { pad / 2 };
    let (pad_top, pad_left) = (half(new_h - h), half(new_w - w));
    // Where the crop starts in the padded canvas (0 along a padded axis, which fits exactly).
    let (top, left) = (((new_h - crop_h) / 2) as i64, ((new_w - crop_w) / 2) as i64);
    let mut out = vec![0u8; crop_h * crop_w * ch];
    for y in 0..crop_h {
        for x in 0..crop_w {
            // Coordinates in the padded canvas, then in the source image.
            let (py, px) = (top + y as i64, left + x as i64);
            let (sy, sx) = (py - pad_top as i64, px - pad_left as i64);
            if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                let src = (sy as usize * w + sx as usize) * ch;
                out[(y * crop_w + x) * ch..(y * crop_w + x + 1) * ch].copy_from_slice(&img.data[src..src + ch]);
            }
        }
    }
    Image8::new(crop_w, crop_h, ch, out)
}

/// `IMAGENET_MEAN` / `IMAGENET_STD`, which InternVL's `build_transform` normalises with.
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// InternVL's preprocessing (`load_image` of the model cards and chat scripts): the image is
/// resized with Pillow's bicubic to the grid of `image_size` tiles whose aspect ratio is closest
/// to the image's (among the grids of `min_tiles..=max_tiles` tiles), cut into those tiles row by
/// row, and followed by a thumbnail (the whole image at `image_size`) when there is more than one
/// tile; each tile becomes `ToTensor` (`v / 255` in f32) then ImageNet-normalised: `[tiles, 3, S, S]`.
/// The settings come from config.json (`force_image_size`, `min_dynamic_patch`,
/// `max_dynamic_patch`, `use_thumbnail`, `dynamic_image_size`), as the chat scripts read them.
#[derive(Debug, Clone, PartialEq)]
pub struct InternVlProcessor {
    pub image_size: usize,
    pub min_tiles: usize,
    pub max_tiles: usize,
    pub use_thumbnail: bool,
    /// Off: the image is resized to one tile.
    pub dynamic: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl InternVlProcessor {
    /// From config.json, with the image mean/std of `preprocessor` when it has them (the releases'
    /// hold ImageNet's).
    pub fn from_config(config: &Value, preprocessor: Option<&Value>) -> Result<InternVlProcessor> {
        let vision = config.get("vision_config").cloned().unwrap_or(Value::Null);
        let image_size = match opt_usize(config, "force_image_size")? {
            Some(s) => s,
            None => opt_usize(&vision, "image_size")?
                .context("config.json has neither force_image_size nor vision_config.image_size")?,
        };
        let p = InternVlProcessor {
            image_size,
            min_tiles: opt_usize(config, "min_dynamic_patch")?.unwrap_or(1),
            max_tiles: opt_usize(config, "max_dynamic_patch")?.unwrap_or(12),
            use_thumbnail: flag(config, "use_thumbnail", true)?,
            dynamic: flag(config, "dynamic_image_size", true)?,
            mean: preprocessor.map(|j| triple(j, "image_mean", IMAGENET_MEAN)).transpose()?.unwrap_or(IMAGENET_MEAN),
            std: preprocessor.map(|j| triple(j, "image_std", IMAGENET_STD)).transpose()?.unwrap_or(IMAGENET_STD),
        };
        ensure!(p.image_size > 0, "config.json: force_image_size is 0");
        p.checked("config.json: min_dynamic_patch", "max_dynamic_patch")
    }

    /// The checks every source of the tiling settings shares: a range of tile counts (named by the
    /// source's keys in the error) and a usable normalisation.
    fn checked(self, min_key: &str, max_key: &str) -> Result<InternVlProcessor> {
        ensure!(
            self.min_tiles >= 1 && self.min_tiles <= self.max_tiles,
            "{min_key} {} and {max_key} {} do not make a range of tile counts",
            self.min_tiles,
            self.max_tiles
        );
        ensure!(
            self.std.iter().all(|&s| s != 0.0 && s.is_finite()),
            "image_std {:?} must be finite and non-zero",
            self.std
        );
        Ok(self)
    }

    /// transformers' GotOcr2ImageProcessor, the image processor of the `-hf` InternVL conversions,
    /// from its preprocessor_config.json (missing keys take the class defaults: 384 × 384, the
    /// OpenAI CLIP mean and std, no cropping, 1..12 patches). With `crop_to_patches` it tiles as
    /// InternVL's `dynamic_preprocess` does (`get_optimal_tiled_canvas`: the same closest aspect
    /// ratio and tie rule over the grids sorted by tile count, a resize to the grid, a thumbnail
    /// when more than one tile); tests/fixtures/gen/internvl_hf.py checks its PIL backend's tiles
    /// equal the remote code's bit for bit on the real photographs. Without it, one resized tile.
    pub fn got_ocr2_from_json(json: &Value) -> Result<InternVlProcessor> {
        let size = json.get("size").cloned().unwrap_or(Value::Null);
        let (height, width) = match (opt_usize(&size, "height")?, opt_usize(&size, "width")?) {
            (None, None) => (384, 384),
            (Some(h), Some(w)) => (h, w),
            _ => bail!("size {size} needs both height and width"),
        };
        ensure!(height == width && height > 0, "size {height} × {width}: InternVL's tiles are square and non-empty");
        match opt_usize(json, "resample")? {
            None | Some(3) => {}
            Some(r) => bail!("resample {r}: only bicubic (3), the -hf InternVL processors' filter, is implemented"),
        }
        for key in ["do_resize", "do_rescale", "do_normalize"] {
            ensure!(flag(json, key, true)?, "{key} false is not supported (the -hf InternVL processors set it)");
        }
        let p = InternVlProcessor {
            image_size: height,
            min_tiles: opt_usize(json, "min_patches")?.unwrap_or(1),
            max_tiles: opt_usize(json, "max_patches")?.unwrap_or(12),
            use_thumbnail: true,
            dynamic: flag(json, "crop_to_patches", false)?,
            mean: triple(json, "image_mean", CLIP_MEAN)?,
            std: triple(json, "image_std", CLIP_STD)?,
        };
        p.checked("min_patches", "max_patches")
    }

    /// Qwen-VL's `image_transform` (visual.py: `Resize((image_size, image_size), BICUBIC)` on the
    /// PIL image, `ToTensor`, `Normalize` with the OpenAI CLIP mean and std): one tile of
    /// `visual.image_size`, no tiling, no thumbnail.
    pub fn qwen_vl(config: &Value) -> Result<InternVlProcessor> {
        let visual = config.get("visual").context("config.json has no `visual` section")?;
        let image_size = opt_usize(visual, "image_size")?.context("config.json has no visual.image_size")?;
        ensure!(image_size > 0, "config.json: visual.image_size is 0");
        Ok(InternVlProcessor {
            image_size,
            min_tiles: 1,
            max_tiles: 1,
            use_thumbnail: false,
            dynamic: false,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        })
    }

    /// The `(columns, rows)` of tiles for an image of this size: InternVL's
    /// `find_closest_aspect_ratio` over the grids sorted by tile count. On an exact tie of the
    /// aspect-ratio distance, a later (larger) grid wins when the image's area exceeds half of the
    /// grid's pixels. (Grids of equal tile count are ordered by columns, descending; the remote code
    /// orders them as a Python set iterates, which only matters on an exact tie between two grids
    /// of the same count, which a closer grid always beats when `min_dynamic_patch` is 1.)
    pub fn grid(&self, width: usize, height: usize) -> (usize, usize) {
        if !self.dynamic {
            return (1, 1);
        }
        let mut grids: Vec<(usize, usize)> = (1..=self.max_tiles)
            .flat_map(|i| (1..=self.max_tiles).map(move |j| (i, j)))
            .filter(|&(i, j)| (self.min_tiles..=self.max_tiles).contains(&(i * j)))
            .collect();
        grids.sort_by_key(|&(i, j)| (i * j, std::cmp::Reverse(i)));
        let aspect = width as f64 / height as f64;
        let area = (width * height) as f64;
        let size = self.image_size as f64;
        let (mut best, mut best_diff) = ((1, 1), f64::INFINITY);
        for (i, j) in grids {
            let diff = (aspect - i as f64 / j as f64).abs();
            if diff < best_diff {
                (best, best_diff) = ((i, j), diff);
            } else if diff == best_diff && area > 0.5 * size * size * (i * j) as f64 {
                best = (i, j);
            }
        }
        best
    }

    pub fn process(&self, img: &Image8) -> Result<ProcessedImage> {
        ensure!(img.width > 0 && img.height > 0, "the image is empty ({}x{})", img.width, img.height);
        let s = self.image_size;
        let (cols, rows) = self.grid(img.width, img.height);
        let resized = if (img.width, img.height) == (cols * s, rows * s) {
            img.clone()
        } else {
            resample::resize(img, cols * s, rows * s, Filter::Bicubic)?
        };
        let mut tiles: Vec<Image8> = Vec::with_capacity(cols * rows + 1);
        for r in 0..rows {
            for c in 0..cols {
                tiles.push(crop(&resized, c * s, r * s, s, s));
            }
        }
        if self.use_thumbnail && tiles.len() != 1 {
            tiles.push(if (img.width, img.height) == (s, s) {
                img.clone()
            } else {
                resample::resize(img, s, s, Filter::Bicubic)?
            });
        }
        let mut pixel_values = Vec::with_capacity(tiles.len() * 3 * s * s);
        for tile in &tiles {
            for c in 0..3 {
                let (mean, std) = (self.mean[c] as f32, self.std[c] as f32);
                pixel_values.extend((0..s * s).map(|i| (tile.data[i * 3 + c] as f32 / 255.0 - mean) / std));
            }
        }
        Ok(ProcessedImage { shape: vec![tiles.len(), 3, s, s], pixel_values, grid_thw: None })
    }
}

/// The `width × height` region of `img` at `(left, top)` (inside the image).
fn crop(img: &Image8, left: usize, top: usize, width: usize, height: usize) -> Image8 {
    let ch = img.channels;
    let mut out = Vec::with_capacity(width * height * ch);
    for y in top..top + height {
        let start = (y * img.width + left) * ch;
        out.extend_from_slice(&img.data[start..start + width * ch]);
    }
    Image8::new(width, height, ch, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn min_max_pixels_override_size() {
        let p = QwenVlProcessor::from_json(&json!({"size": {"shortest_edge": 10, "longest_edge": 20},
            "min_pixels": 100, "max_pixels": 2000}))
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (100, 2000));
        let p = QwenVlProcessor::from_json(&json!({"size": {"shortest_edge": 65536, "longest_edge": 16777216},
            "patch_size": 16}))
        .unwrap();
        assert_eq!((p.min_pixels, p.max_pixels, p.patch_size), (65536, 16777216, 16));
        let p = QwenVlProcessor::from_json(&json!({"size": {"min_pixels": 3136, "max_pixels": 12845056}})).unwrap();
        assert_eq!((p.min_pixels, p.max_pixels), (3136, 12845056));
        let p = QwenVlProcessor::from_json(&json!({})).unwrap();
        assert_eq!((p.min_pixels, p.max_pixels, p.patch_size, p.normalize.mean), (3136, 1003520, 14, CLIP_MEAN));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(QwenVlProcessor::from_json(&json!({"patch_size": 0})).is_err());
        assert!(QwenVlProcessor::from_json(&json!({"min_pixels": 10, "max_pixels": 5})).is_err());
        assert!(QwenVlProcessor::from_json(&json!({"image_std": [1, 0, 1]})).is_err());
        assert!(QwenVlProcessor::from_json(&json!({"resample": 0})).is_err());
        assert!(ClipProcessor::from_json(&json!({"size": "big"})).is_err());
    }

    #[test]
    fn smart_resize_properties() {
        // Whatever the input, the sides are multiples of the factor and the area is within
        // bounds (as far as the factor allows) with the aspect ratio roughly kept.
        for (h, w) in [(1, 1), (7, 300), (480, 640), (1080, 1920), (4000, 3000), (28, 5000), (10000, 60)] {
            let (rh, rw) = smart_resize(h, w, 28, 3136, 1003520).unwrap();
            assert!(rh % 28 == 0 && rw % 28 == 0 && rh >= 28 && rw >= 28, "{h}x{w} -> {rh}x{rw}");
            assert!(rh * rw <= 1003520 && rh * rw >= 3136, "{h}x{w} -> {rh}x{rw}");
        }
        assert!(smart_resize(1, 201, 28, 3136, 1003520).is_err());
        assert!(smart_resize(0, 10, 28, 3136, 1003520).is_err());
        // Python rounds halves to even: 42/28 = 1.5 -> 2, 70/28 = 2.5 -> 2.
        assert_eq!(smart_resize(42, 70, 28, 1, 1 << 30).unwrap(), (56, 56));
    }

    #[test]
    fn patch_rows_follow_merge_windows() {
        // A 4x4-patch image (patch 1, merge 2) whose pixel value encodes its position: row r of
        // pixel_values must be the pixel at the r-th position in merge-window order.
        let p = QwenVlProcessor {
            resize: ResizeRule::Qwen,
            backend: Backend::Pillow,
            do_resize: false,
            filter: Filter::Bicubic,
            min_pixels: 1,
            max_pixels: 1 << 20,
            patch_size: 1,
            merge_size: 2,
            temporal_patch_size: 2,
            normalize: Normalize {
                do_rescale: false,
                rescale_factor: 1.0,
                do_normalize: false,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
        };
        let data: Vec<u8> = (0..16).flat_map(|i| [i as u8, 100 + i as u8, 200 + i as u8]).collect();
        let out = p.process(&Image8::new(4, 4, 3, data)).unwrap();
        assert_eq!(out.shape, vec![16, 6]);
        assert_eq!(out.grid_thw, Some([1, 4, 4]));
        let order = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15];
        for (r, &i) in order.iter().enumerate() {
            let v = i as f32;
            assert_eq!(&out.pixel_values[r * 6..r * 6 + 6], &[v, v, 100.0 + v, 100.0 + v, 200.0 + v, 200.0 + v]);
        }
    }

    #[test]
    fn clip_resize_and_crop_sizes() {
        let p = ClipProcessor::from_json(&json!({"size": {"shortest_edge": 336}, "crop_size": 336})).unwrap();
        assert_eq!(p.resized_size(480, 640), (336, 448));
        assert_eq!(p.resized_size(1000, 333), (1009, 336));
        assert_eq!(p.output_size(1000, 333), (336, 336));
        // Crop larger than the image: zero padding, centered with the odd pixel of padding
        // before (numpy's ceil of half the padding): the lone pixel lands at row 1, column 1.
        let img = Image8::new(1, 1, 3, vec![9, 9, 9]);
        let c = center_crop(&img, 2, 3, Backend::Pillow);
        assert_eq!((c.width, c.height), (3, 2));
        let lit: Vec<usize> = (0..6).filter(|&i| c.data[i * 3] == 9).collect();
        assert_eq!(lit, vec![4]);
        let c = center_crop(&img, 2, 3, Backend::Torchvision);
        let lit: Vec<usize> = (0..6).filter(|&i| c.data[i * 3] == 9).collect();
        assert_eq!(lit, vec![1]);
    }

    // ---- Parity with transformers (references made by Hugging Face's own processors) ----

    use crate::io::safetensors::load_all;
    use crate::tensor::Tensor;
    use std::collections::BTreeMap;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn i64s(t: &Tensor) -> Vec<i64> {
        t.bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn assert_matches(name: &str, got: &ProcessedImage, reference: &BTreeMap<String, Tensor>, prefix: &str) {
        let want = &reference[&format!("{prefix}pixel_values")];
        assert_eq!(got.shape, want.shape, "{name}: pixel_values shape");
        let err = max_abs_diff(&got.pixel_values, &want.to_f32().unwrap());
        println!("{name}: pixel_values {:?} max abs error {err:e}", got.shape);
        assert!(err <= 1e-5, "{name}: max abs error {err}");
        if let Some(g) = got.grid_thw {
            let want = i64s(&reference[&format!("{prefix}image_grid_thw")]);
            assert_eq!(g.map(|x| x as i64).to_vec(), want, "{name}: image_grid_thw");
        }
    }

    /// Every VL fixture: image.png through the processor its preprocessor_config.json describes
    /// gives the fixture's pixel_values and image_grid_thw.
    #[test]
    fn fixtures_match_transformers() {
        for name in [
            "qwen2_vl",
            "qwen2_5_vl",
            "qwen3_vl",
            "qwen3_vl_moe",
            "qwen3_vl_realvocab",
            "llava",
            "internvl_chat",
            "internvl_hf",
            "glm4v",
            "glm4v_moe",
        ] {
            let dir = fixture(name);
            let processor = ImageProcessor::load(&dir).unwrap();
            let img = crate::data::image::load_rgb(&dir.join("image.png")).unwrap();
            let got = processor.process(&img).unwrap();
            let reference = load_all(&dir.join("reference.safetensors")).unwrap();
            assert_matches(name, &got, &reference, "");
            assert_eq!(matches!(processor, ImageProcessor::Clip(_)), name == "llava");
        }
    }

    /// Qwen-VL's image_transform of the real PNG photographs at the release size 448 (every 16th row
    /// of the reference, all columns) and at the fixture's 112, against visual.py's transform in
    /// tests/fixtures/gen/qwen_vl.py (Pillow's resize, ToTensor, Normalize); the fixture's image.
    #[test]
    fn qwen_vl_resizes_real_photographs_as_its_image_transform() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("qwen_vl.safetensors")).unwrap();
        let cases = read_json(&dir.join("qwen_vl.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        for (name, cfg) in cases.as_object().unwrap() {
            let size = cfg["image_size"].as_u64().unwrap() as usize;
            let step = cfg["row_step"].as_u64().unwrap() as usize;
            let p = InternVlProcessor::qwen_vl(&serde_json::json!({"visual": {"image_size": size}})).unwrap();
            let img = crate::data::image::load_rgb(&photos.join(cfg["photo"].as_str().unwrap())).unwrap();
            let got = p.process(&img).unwrap();
            assert_eq!(got.shape, vec![1, 3, size, size], "{name}");
            let rows: Vec<f32> = (0..3)
                .flat_map(|c| (0..size).step_by(step).map(move |y| (c, y)))
                .flat_map(|(c, y)| got.pixel_values[(c * size + y) * size..(c * size + y + 1) * size].to_vec())
                .collect();
            let err = max_abs_diff(&rows, &reference[name].to_f32().unwrap());
            println!("{name}: {} rows, max abs error {err:e}", rows.len() / size);
            assert!(err <= 1e-5, "{name}: max abs error {err}");
        }
        assert_eq!(cases.as_object().unwrap().len(), 6);
        let dir = fixture("qwen_vl");
        let processor = ImageProcessor::load(&dir).unwrap();
        assert!(matches!(processor, ImageProcessor::QwenVlResize(_)));
        let img = crate::data::image::load_rgb(&dir.join("image.png")).unwrap();
        assert_matches(
            "qwen_vl",
            &processor.process(&img).unwrap(),
            &load_all(&dir.join("reference.safetensors")).unwrap(),
            "",
        );
    }

    /// GLM-4.1V's processor against transformers' `Glm4vImageProcessorPil` (tests/fixtures/gen/glm4v.py):
    /// every real photograph under a small pixel budget, the two images of the glm4v_wide fixture
    /// (downscaled photographs, 6×10 and 8×4 patches), and `smart_resize` on camera, panorama,
    /// tiny and the photographs' sizes with the real GLM-4.1V settings.
    #[test]
    fn glm4v_processes_real_photographs_as_transformers() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("glm4v.safetensors")).unwrap();
        let cases = read_json(&dir.join("glm4v.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        let base = read_json(&fixture("glm4v").join("preprocessor_config.json")).unwrap();
        for (name, case) in cases.as_object().unwrap() {
            let mut json = base.clone();
            json["size"] = case["size"].clone();
            let p = QwenVlProcessor::glm4v_from_json(&json).unwrap();
            let img = crate::data::image::load_rgb(&photos.join(case["photo"].as_str().unwrap())).unwrap();
            assert_matches(name, &p.process(&img).unwrap(), &reference, &format!("{name}."));
        }
        assert_eq!(cases.as_object().unwrap().len(), 3);

        let wide = fixture("glm4v_wide");
        let ImageProcessor::QwenVl(p) = ImageProcessor::load(&wide).unwrap() else {
            panic!("glm4v is a patch processor")
        };
        assert_eq!(p.resize, ResizeRule::Glm4v);
        let want = load_all(&wide.join("reference.safetensors")).unwrap();
        let (mut values, mut grids) = (Vec::new(), Vec::new());
        for f in ["image.png", "image2.png"] {
            let got = p.process(&crate::data::image::load_rgb(&wide.join(f)).unwrap()).unwrap();
            values.extend(got.pixel_values);
            grids.extend(got.grid_thw.unwrap().map(|x| x as i64));
        }
        assert_eq!(grids, i64s(&want["image_grid_thw"]));
        let err = max_abs_diff(&values, &want["pixel_values"].to_f32().unwrap());
        assert!(err <= 1e-5, "glm4v_wide: max abs error {err}");

        let rows = i64s(&reference["glm4v.smart_resize"]);
        for r in rows.chunks(4) {
            let got = glm4v_smart_resize(2, r[0] as usize, r[1] as usize, 2, 28, 12544, 9633792).unwrap();
            assert_eq!((got.0 as i64, got.1 as i64), (r[2], r[3]), "{r:?}");
        }
        assert!(rows.len() >= 16 * 4);
        assert!(glm4v_smart_resize(2, 10, 2500, 2, 28, 12544, 9633792).is_err());
        assert!(glm4v_smart_resize(1, 100, 100, 2, 28, 12544, 9633792).is_err());
    }

    /// InternVL's tiling of real photographs (downscaled, 6 and 13 tiles with the thumbnail)
    /// against its own `dynamic_preprocess` + `build_transform` in tests/fixtures/gen/internvl.py,
    /// and its grid choice on real camera sizes, extreme panoramas and exact ties.
    #[test]
    fn internvl_tiles_real_photographs_as_its_chat_scripts() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("internvl.safetensors")).unwrap();
        let cases = read_json(&dir.join("internvl.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        let settings = |image_size: u64, max: u64| {
            InternVlProcessor::from_config(
                &serde_json::json!({"force_image_size": image_size, "min_dynamic_patch": 1, "max_dynamic_patch": max}),
                None,
            )
            .unwrap()
        };
        for (name, cfg) in cases.as_object().unwrap() {
            let p = settings(cfg["image_size"].as_u64().unwrap(), cfg["max_num"].as_u64().unwrap());
            let img = crate::data::image::load_rgb(&photos.join(cfg["photo"].as_str().unwrap())).unwrap();
            let ratio: Vec<usize> =
                cfg["ratio"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            assert_eq!(p.grid(img.width, img.height), (ratio[0], ratio[1]), "{name}");
            assert_matches(name, &p.process(&img).unwrap(), &reference, &format!("{name}."));
        }
        assert_eq!(cases.as_object().unwrap().len(), 4);
        let rows = i64s(&reference["internvl.grids"]);
        for r in rows.chunks(5) {
            let p = settings(448, r[2] as u64);
            assert_eq!(p.grid(r[0] as usize, r[1] as usize), (r[3] as usize, r[4] as usize), "{r:?}");
        }
        assert!(rows.len() >= 50 * 5);
        // One tile without dynamic tiling; nonsense settings are refused.
        let one = InternVlProcessor { dynamic: false, ..settings(28, 6) };
        let img = Image8::new(90, 30, 3, vec![7; 90 * 30 * 3]);
        assert_eq!(one.process(&img).unwrap().shape, vec![1, 3, 28, 28]);
        let bad = serde_json::json!({"force_image_size": 448, "min_dynamic_patch": 5, "max_dynamic_patch": 4});
        assert!(InternVlProcessor::from_config(&bad, None).is_err());
    }

    /// transformers' `-hf` InternVL processor (GotOcr2ImageProcessor with `crop_to_patches`) read
    /// from a preprocessor_config.json tiles the real photographs as the remote code does:
    /// tests/fixtures/gen/internvl_hf.py asserts transformers' own -hf processor gives exactly
    /// the tiles of tests/fixtures/real_photos/internvl.safetensors on them. Its class defaults
    /// and bad settings.
    #[test]
    fn internvl_hf_processor_tiles_real_photographs_as_transformers() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("internvl.safetensors")).unwrap();
        let cases = read_json(&dir.join("internvl.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        for (name, cfg) in cases.as_object().unwrap() {
            let size = cfg["image_size"].as_u64().unwrap();
            let json = serde_json::json!({"image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": true,
                "min_patches": 1, "max_patches": cfg["max_num"], "size": {"height": size, "width": size},
                "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 3});
            let p = InternVlProcessor::got_ocr2_from_json(&json).unwrap();
            let img = crate::data::image::load_rgb(&photos.join(cfg["photo"].as_str().unwrap())).unwrap();
            assert_matches(name, &p.process(&img).unwrap(), &reference, &format!("{name}."));
        }
        let d = InternVlProcessor::got_ocr2_from_json(&serde_json::json!({})).unwrap();
        assert_eq!((d.image_size, d.max_tiles, d.dynamic, d.mean), (384, 12, false, CLIP_MEAN));
        for bad in [
            serde_json::json!({"size": {"height": 448, "width": 224}}),
            serde_json::json!({"resample": 2}),
            serde_json::json!({"min_patches": 5, "max_patches": 4}),
            serde_json::json!({"do_normalize": false}),
        ] {
            assert!(InternVlProcessor::got_ocr2_from_json(&bad).is_err(), "{bad}");
        }
    }

    /// Real photographs resized by transformers' PIL-backed processors (Pillow's antialiased
    /// bicubic, down and up), from tests/fixtures/gen/real_photos.py.
    #[test]
    fn real_photographs_match_transformers() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("reference.safetensors")).unwrap();
        let cases = read_json(&dir.join("cases.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        let mut checked = 0;
        for (name, cfg) in cases.as_object().unwrap() {
            let Some(kind) = cfg.get("processor").and_then(Value::as_str) else { continue };
            if name.starts_with("torchvision.") {
                continue;
            }
            let mut img = crate::data::image::load_rgb(&photos.join(cfg["photo"].as_str().unwrap())).unwrap();
            if let Some(c) = cfg["crop"].as_array() {
                let c: Vec<usize> = c.iter().map(|v| v.as_u64().unwrap() as usize).collect();
                let (x0, y0, x1, y1) = (c[0], c[1], c[2], c[3]);
                let data = (y0..y1)
                    .flat_map(|y| img.data[(y * img.width + x0) * 3..(y * img.width + x1) * 3].to_vec())
                    .collect();
                img = Image8::new(x1 - x0, y1 - y0, 3, data);
            }
            let processor = match kind {
                "qwen_vl" => ImageProcessor::QwenVl(QwenVlProcessor::from_json(cfg).unwrap()),
                _ => ImageProcessor::Clip(ClipProcessor::from_json(cfg).unwrap()),
            };
            if let ImageProcessor::QwenVl(p) = &processor {
                // The cases resize for real (not the identity).
                assert_ne!(p.target_size(img.height, img.width).unwrap(), (img.height, img.width), "{name}");
            }
            assert_matches(name, &processor.process(&img).unwrap(), &reference, &format!("{name}."));
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    /// smart_resize on the photographs' sizes and common camera sizes, with the real Qwen2.5-VL
    /// and Qwen3-VL defaults, against transformers' own function.
    #[test]
    fn smart_resize_matches_transformers_on_real_sizes() {
        let reference = load_all(&fixture("real_photos").join("reference.safetensors")).unwrap();
        for (name, factor, lo, hi) in [("qwen2_5_vl", 28, 3136, 12845056), ("qwen3_vl", 32, 65536, 16777216)] {
            let rows = i64s(&reference[&format!("smart_resize.{name}")]);
            assert!(rows.len() >= 4 * 4);
            for r in rows.chunks(4) {
                let got = smart_resize(r[0] as usize, r[1] as usize, factor, lo, hi).unwrap();
                assert_eq!(got, (r[2] as usize, r[3] as usize), "{name}: {}x{}", r[0], r[1]);
            }
        }
    }

    /// The torchvision backend (what "fast" processors such as the Qwen3-VL releases'
    /// Qwen2VLImageProcessorFast run) against transformers with torch, on real photographs
    /// downscaled hard and on an upscaled crop.
    #[test]
    fn real_photographs_match_transformers_torchvision() {
        let dir = fixture("real_photos");
        let reference = load_all(&dir.join("torchvision.safetensors")).unwrap();
        let cases = read_json(&dir.join("cases.json")).unwrap();
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        let mut checked = 0;
        for (key, cfg) in cases.as_object().unwrap() {
            let Some(name) = key.strip_prefix("torchvision.") else { continue };
            let img = match reference.get(&format!("{name}.image")) {
                Some(t) => Image8::new(t.shape[1], t.shape[0], 3, t.bytes.clone()),
                None => {
                    let img = crate::data::image::load_rgb(&photos.join(cfg["photo"].as_str().unwrap())).unwrap();
                    match cfg["crop"].as_array() {
                        Some(c) => {
                            let c: Vec<usize> = c.iter().map(|v| v.as_u64().unwrap() as usize).collect();
                            let data = (c[1]..c[3])
                                .flat_map(|y| img.data[(y * img.width + c[0]) * 3..(y * img.width + c[2]) * 3].to_vec())
                                .collect();
                            Image8::new(c[2] - c[0], c[3] - c[1], 3, data)
                        }
                        None => img,
                    }
                }
            };
            let mut p = QwenVlProcessor::from_json(cfg).unwrap();
            p.backend = Backend::Torchvision;
            assert_ne!(p.target_size(img.height, img.width).unwrap(), (img.height, img.width), "{name}");
            let got = p.process(&img).unwrap();
            let want = reference[&format!("{name}.pixel_values")].to_f32().unwrap();
            let diffs: Vec<f32> = got.pixel_values.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            let err = diffs.iter().fold(0f32, |a, &b| a.max(b));
            let off = diffs.iter().filter(|&&d| d > 1e-5).count();
            println!("torchvision {name}: {:?} max abs error {err:e}, {off} of {} values off", got.shape, want.len());
            assert!(err <= 1e-5, "{name}: max abs error {err}");
            assert_eq!(
                got.grid_thw.map(|g| g.map(|x| x as i64).to_vec()),
                Some(i64s(&reference[&format!("{name}.image_grid_thw")]))
            );
            checked += 1;
        }
        assert_eq!(checked, 3);
    }

    #[test]
    fn fast_processors_select_torchvision() {
        assert_eq!(
            Backend::from_json(&json!({"image_processor_type": "Qwen2VLImageProcessorFast"})),
            Backend::Torchvision
        );
        assert_eq!(Backend::from_json(&json!({"image_processor_type": "Qwen2VLImageProcessor"})), Backend::Pillow);
        assert_eq!(Backend::from_json(&json!({})), Backend::Pillow);
    }
}
