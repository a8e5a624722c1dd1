//! Calibration sets (`--calib_data PATH`, alias `--calib_images`) turned into model inputs.
//!
//! Text models ([`load_text`]): a plain text file (`.txt` or any non-JSON file), or a `.jsonl`
//! / `.json` of records, each a string, `{"text": ...}` or `{"input_ids": [...]}`
//! (pre-tokenized; needs no tokenizer). The records are tokenized without special tokens and
//! concatenated in order (text records followed by the tokens of a blank line, `"\n\n"`); the
//! stream is cut into `samples` consecutive windows. Windows of text start with the tokens the
//! tokenizer puts before any text (BOS for Llama, none for Qwen), as the model sees text when it
//! runs; pre-tokenized ids are used verbatim. The first `samples * seq_len` tokens are used.
//!
//! Vision-language models ([`load_vision`]), the forms msModelSlim accepts:
//! 1. a folder of images (`.png`, `.jpg`, `.jpeg`): each image with `default_text`;
//! 2. a folder holding one `.json`/`.jsonl` of `{"image": "...", "text": "..."}` entries (image
//!    paths relative to that file); images of the folder it does not mention get `default_text`;
//! 3. a folder with `index.json` or `index.jsonl` (not both) of the same entries.
//!
//! A `.json`/`.jsonl` file given directly works too. An entry may carry `"input_ids"` holding
//! one image token (expanded to the image's size) instead of `"text"`.

use super::image::{is_image_path, load_rgb};
use super::processor::{read_json, ImageProcessor, ProcessedImage};
use super::prompt::{expand_image_tokens, image_prompt, missing_tokenizer, ChatTemplate, TextTokenizer};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One record of a calibration file: text to tokenize, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<i64>),
}

/// A record and where it came from (`file:line` or `file entry N`), for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub origin: String,
    pub image: Option<PathBuf>,
    pub prompt: Option<Prompt>,
}

/// Parses one JSON record: a string, or an object with `text` / `input_ids` and maybe `image`
/// (resolved against `base`).
fn parse_record(v: &Value, origin: String, base: &Path) -> Result<Record> {
    let obj = match v {
        Value::String(s) => return Ok(Record { origin, image: None, prompt: Some(Prompt::Text(s.clone())) }),
        Value::Object(o) => o,
        other => bail!("{origin}: expected a string or an object with \"text\", found {other}"),
    };
    let text = match obj.get("text") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => bail!("{origin}: \"text\" is empty"),
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => bail!("{origin}: \"text\" is {other}, not a string"),
    };
    let ids = match obj.get("input_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_i64().with_context(|| format!("{origin}: input_ids holds {x}, not an integer")))
                .collect::<Result<Vec<i64>>>()?,
        ),
        Some(other) => bail!("{origin}: \"input_ids\" is {other}, not a list of integers"),
    };
    let prompt = match (text, ids) {
        (Some(_), Some(_)) => bail!("{origin}: has both \"text\" and \"input_ids\"; give one"),
        (Some(t), None) => Some(Prompt::Text(t)),
        (None, Some(ids)) if ids.is_empty() => bail!("{origin}: \"input_ids\" is empty"),
        (None, Some(ids)) => Some(Prompt::Ids(ids)),
        (None, None) => None,
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() => {
            let p = Path::new(s.trim());
            Some(if p.is_absolute() { p.to_path_buf() } else { base.join(p) })
        }
        Some(other) => bail!("{origin}: \"image\" is {other}, not a file path"),
    };
    if image.is_none() && prompt.is_none() {
        bail!("{origin}: has neither \"text\", \"input_ids\" nor \"image\"");
    }
    Ok(Record { origin, image, prompt })
}

/// Reads the records of a `.jsonl` (one per non-blank line) or `.json` (one record or a list).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let name = path.display();
    let mut out = Vec::new();
    if is_ext(path, "jsonl") {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).with_context(|| format!("{name}:{}: not valid JSON", i + 1))?;
            out.push(parse_record(&v, format!("{name}:{}", i + 1), base)?);
        }
    } else {
        if text.trim().is_empty() {
            bail!("{name}: empty");
        }
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{name}: not valid JSON"))?;
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    out.push(parse_record(item, format!("{name} entry {}", i + 1), base)?);
                }
            }
            single => out.push(parse_record(&single, format!("{name} entry 1"), base)?),
        }
    }
    if out.is_empty() {
        bail!("{name}: empty (no records)");
    }
    Ok(out)
}

fn is_ext(path: &Path, ext: &str) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

fn is_json(path: &Path) -> bool {
    is_ext(path, "json") || is_ext(path, "jsonl")
}

fn check_vocab(ids: &[i64], vocab_size: usize, origin: &str) -> Result<()> {
    if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t as u64 >= vocab_size as u64) {
        bail!("{origin}: token id {bad} is outside the vocabulary (vocab_size {vocab_size} in config.json)");
    }
    Ok(())
}

/// `samples` sequences of `seq_len` token ids from a text calibration file (see the module
/// documentation for the rules). `vocab_size` is the model's (config.json).
pub fn load_text(
    model_dir: &Path,
    path: &Path,
    samples: usize,
    seq_len: usize,
    vocab_size: usize,
) -> Result<Vec<Vec<i64>>> {
    if samples == 0 || seq_len == 0 {
        bail!("--calib_samples and --calib_seq_len must be positive (got {samples} and {seq_len})");
    }
    if path.is_dir() {
        bail!("{}: is a folder; text models calibrate on a .txt or .jsonl file", path.display());
    }
    if !path.is_file() {
        bail!("{}: no such calibration file (text models take a .txt or .jsonl file)", path.display());
    }
    let records = if is_json(path) {
        read_records(path)?
    } else {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
        if text.trim().is_empty() {
            bail!("{}: empty", path.display());
        }
        vec![Record { origin: path.display().to_string(), image: None, prompt: Some(Prompt::Text(text)) }]
    };
    if let Some(r) = records.iter().find(|r| r.image.is_some()) {
        bail!("{}: has an image; a text model calibrates on text only", r.origin);
    }
    let needs_tokenizer = records.iter().any(|r| matches!(r.prompt, Some(Prompt::Text(_))));
    let tokenizer = if needs_tokenizer { Some(TextTokenizer::load(model_dir)?) } else { None };
    let (prefix, separator) = match &tokenizer {
        Some(t) => (t.special_prefix()?, t.encode("\n\n", false)?),
        None => (Vec::new(), Vec::new()),
    };
    check_vocab(&prefix, vocab_size, &format!("{} (special tokens)", model_dir.join("tokenizer.json").display()))?;
    if seq_len <= prefix.len() {
        bail!(
            "--calib_seq_len {seq_len} leaves no room after the {} special token(s) each sequence starts with",
            prefix.len()
        );
    }

    let mut stream = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let ids = match &r.prompt {
            Some(Prompt::Text(t)) => {
                let mut ids = tokenizer.as_ref().unwrap().encode(t, false).with_context(|| r.origin.clone())?;
                if i + 1 < records.len() {
                    ids.extend_from_slice(&separator);
                }
                ids
            }
            Some(Prompt::Ids(ids)) => ids.clone(),
            None => unreachable!("records without a prompt have an image"),
        };
        check_vocab(&ids, vocab_size, &r.origin)?;
        stream.extend(ids);
    }
    let body = seq_len - prefix.len();
    let needed = samples * body;
    if stream.len() < needed {
        bail!(
            "{}: {} tokens, fewer than the {needed} needed for {samples} sequences of {seq_len} tokens{}",
            path.display(),
            stream.len(),
            if prefix.is_empty() { String::new() } else { format!(" ({} special token(s) each)", prefix.len()) }
        );
    }
    Ok(stream[..needed].chunks(body).map(|c| prefix.iter().chain(c).copied().collect()).collect())
}

/// Lists the image/prompt pairs of a vision calibration set, in the three folder forms or as
/// one `.json`/`.jsonl` file. Entries without text get `default_text`. Every entry has an image.
pub fn read_vision_set(path: &Path, default_text: &str) -> Result<Vec<Record>> {
    let with_default = |mut r: Record| {
        r.prompt.get_or_insert_with(|| Prompt::Text(default_text.to_string()));
        r
    };
    let records = if path.is_file() {
        if !is_json(path) {
            bail!("{}: a calibration set is a folder or a .json/.jsonl file", path.display());
        }
        read_records(path)?
    } else if path.is_dir() {
        read_folder(path, default_text)?
    } else {
        bail!("{}: no such calibration folder or file", path.display());
    };
    let records: Vec<Record> = records.into_iter().map(with_default).collect();
    for r in &records {
        let Some(image) = &r.image else {
            bail!("{}: has no \"image\"; vision-language calibration takes an image with each prompt", r.origin);
        };
        if !is_image_path(image) {
            bail!("{}: {} is not a supported image (.png, .jpg, .jpeg)", r.origin, image.display());
        }
        if !image.is_file() {
            bail!("{}: image {} does not exist", r.origin, image.display());
        }
    }
    Ok(records)
}

fn read_folder(dir: &Path, default_text: &str) -> Result<Vec<Record>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    files.retain(|p| p.is_file());
    files.sort();
    let images: Vec<&PathBuf> = files.iter().filter(|p| is_image_path(p)).collect();
    let (index_json, index_jsonl) = (dir.join("index.json"), dir.join("index.jsonl"));
    if index_json.is_file() && index_jsonl.is_file() {
        bail!("{}: holds both index.json and index.jsonl; keep one", dir.display());
    }
    if index_json.is_file() {
        return read_records(&index_json);
    }
    if index_jsonl.is_file() {
        return read_records(&index_jsonl);
    }
    let listings: Vec<&PathBuf> = files.iter().filter(|p| is_json(p)).collect();
    match listings.as_slice() {
        [] => {
            if images.is_empty() {
                bail!("{}: no images (.png, .jpg, .jpeg) and no .json/.jsonl listing", dir.display());
            }
            Ok(images
                .iter()
                .map(|p| Record {
                    origin: p.display().to_string(),
                    image: Some(p.to_path_buf()),
                    prompt: Some(Prompt::Text(default_text.to_string())),
                })
                .collect())
        }
        [listing] => {
            let mut records = read_records(listing)?;
            let mentioned: Vec<PathBuf> =
                records.iter().filter_map(|r| r.image.as_ref()).filter_map(|p| p.canonicalize().ok()).collect();
            for p in images {
                if !p.canonicalize().is_ok_and(|c| mentioned.contains(&c)) {
                    records.push(Record {
                        origin: p.display().to_string(),
                        image: Some(p.to_path_buf()),
                        prompt: Some(Prompt::Text(default_text.to_string())),
                    });
                }
            }
            Ok(records)
        }
        many => bail!(
            "{}: holds {} .json/.jsonl files ({}); keep one listing, or name index.json",
            dir.display(),
            many.len(),
            many.iter().map(|p| p.file_name().unwrap().to_string_lossy()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// One vision-language calibration sample, ready for the forward.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionSample {
    /// The record it came from.
    pub origin: String,
    pub input_ids: Vec<i64>,
    /// Qwen: `[grid_t*grid_h*grid_w, C*T*P*P]`; LLaVA: `[1, 3, H, W]`.
    pub pixel_shape: Vec<usize>,
    pub pixel_values: Vec<f32>,
    /// Qwen only: `[grid_t, grid_h, grid_w]`.
    pub image_grid_thw: Option<[i64; 3]>,
}

impl VisionSample {
    /// The sample as tensors named like the fixtures' `reference.safetensors` (`input_ids`
    /// `[1, S]` i64, `pixel_values` f32, `image_grid_thw` `[1, 3]` i64 for Qwen).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("input_ids".to_string(), Tensor::from_i64(&[1, self.input_ids.len()], &self.input_ids)),
            ("pixel_values".to_string(), Tensor::from_f32(&self.pixel_shape, &self.pixel_values)),
        ];
        if let Some(g) = self.image_grid_thw {
            out.push(("image_grid_thw".to_string(), Tensor::from_i64(&[1, 3], &g)));
        }
        out
    }
}

/// How a vision-language model turns an image into tokens.
#[derive(Debug, Clone, PartialEq)]
enum ImageTokens {
    /// Qwen: `grid_t*grid_h*grid_w / merge_size²` image pads between vision start and end.
    Qwen { image: i64, vision_start: i64, vision_end: i64, merge_size: usize },
    /// LLaVA: one `<image>` per vision feature, `(H/patch)*(W/patch)` (+1 for the CLS feature
    /// when `vision_feature_select_strategy` is `full`).
    Llava { image: i64, patch_size: usize, keeps_cls: bool },
    /// InternVL: `<img>` + `tokens_per_tile` IMG_CONTEXT tokens per tile + `</img>`. `wrap`: the
    /// prompt names the image by one `<IMG_CONTEXT>` and the processor adds `<img>` / `</img>`
    /// around its expansion (transformers' InternVLProcessor, the `-hf` layout); otherwise the
    /// prompt already holds `<img><IMG_CONTEXT></img>` (the remote code's chat).
    InternVl { image: i64, start: i64, end: i64, tokens_per_tile: usize, wrap: bool },
    /// Qwen-VL: `Picture 1:<img>` + `n_queries` positions + `</img>\n` (its tokenizer fills them with
    /// the image path's bytes and image pads); the ids are `visual.image_start_id` and the next two.
    QwenVl { start: i64, end: i64, pad: i64, n_queries: usize },
}

/// What a vision-language model folder needs to turn records into samples.
pub struct VisionModel {
    dir: PathBuf,
    pub processor: ImageProcessor,
    tokens: ImageTokens,
    pub vocab_size: usize,
    tokenizer: Option<TextTokenizer>,
    template: Option<ChatTemplate>,
}

fn config_i64(config: &Value, keys: &[&str], default: i64) -> Result<i64> {
    let text = config.get("text_config");
    for k in keys {
        for layer in [Some(config), text].into_iter().flatten() {
            if let Some(v) = layer.get(*k).filter(|v| !v.is_null()) {
                return v.as_i64().with_context(|| format!("config.json: {k} is {v}, not an integer"));
            }
        }
    }
    Ok(default)
}

impl VisionModel {
    pub fn load(model_dir: &Path) -> Result<VisionModel> {
        let config_path = model_dir.join("config.json");
        let config = read_json(&config_path)?;
        let vocab_size = crate::model::config::TextConfig::from_json(&config)
            .with_context(|| config_path.display().to_string())?
            .vocab_size;
        let processor = ImageProcessor::load(model_dir)?;
        let tokenizer = if TextTokenizer::exists(model_dir) { Some(TextTokenizer::load(model_dir)?) } else { None };
        let tokens = match &processor {
            ImageProcessor::QwenVlResize(_) => {
                let tower = crate::model::vision::qwen_vl::Config::from_json(&config)
                    .with_context(|| config_path.display().to_string())?;
                let start = config["visual"]
                    .get("image_start_id")
                    .and_then(Value::as_i64)
                    .with_context(|| format!("{}: no visual.image_start_id", config_path.display()))?;
                ImageTokens::QwenVl { start, end: start + 1, pad: start + 2, n_queries: tower.n_queries }
            }
            ImageProcessor::InternVl(p) => {
                // config.json's ids when it has them, else the tokenizer's (as the chat scripts and
                // transformers' InternVLProcessor do: the -hf tokenizer names them
                // start_image_token / end_image_token / context_image_token).
                let id = |keys: &[&str], token: &str| -> Result<i64> {
                    match keys.iter().find_map(|k| config.get(*k).and_then(Value::as_i64)) {
                        Some(id) => Ok(id),
                        None => tokenizer.as_ref().and_then(|t| t.token_to_id(token)).with_context(|| {
                            format!("{}: no {} and no {token} in a tokenizer.json", config_path.display(), keys[0])
                        }),
                    }
                };
                let vision = crate::model::config::vision_view(&config)
                    .with_context(|| format!("{}: no vision_config", config_path.display()))?;
                let patch = vision.square(&["patch_size"])?;
                let ratio = config.get("downsample_ratio").and_then(Value::as_f64).unwrap_or(0.5);
                let side = (p.image_size / patch) as f64 * ratio;
                let tokens_per_tile = (side * side).round() as usize;
                let hf = config.get("model_type").and_then(Value::as_str) == Some("internvl");
                if hf {
                    // InternVLProcessor writes `image_seq_length` tokens per tile (processor_config.json);
                    // the model needs one per pixel-shuffled patch, or transformers' forward fails.
                    let processor_config = model_dir.join("processor_config.json");
                    if processor_config.is_file() {
                        if let Some(n) = read_json(&processor_config)?.get("image_seq_length").and_then(Value::as_u64) {
                            ensure!(
                                n as usize == tokens_per_tile,
                                "{}: image_seq_length {n}, but a {}-pixel tile of {patch}-pixel patches shuffled by {ratio} gives {tokens_per_tile} image features",
                                processor_config.display(),
                                p.image_size
                            );
                        }
                    }
                }
                ImageTokens::InternVl {
                    image: id(&["img_context_token_id", "image_token_id"], "<IMG_CONTEXT>")?,
                    start: id(&["img_start_token_id"], "<img>")?,
                    end: id(&["img_end_token_id"], "</img>")?,
                    tokens_per_tile,
                    wrap: hf,
                }
            }
            ImageProcessor::QwenVl(p) => ImageTokens::Qwen {
                image: config_i64(&config, &["image_token_id"], 151655)?,
                // GLM-4.1V: `<|begin_of_image|>` / `<|end_of_image|>` (image_start / image_end_token_id).
                vision_start: config_i64(&config, &["vision_start_token_id", "image_start_token_id"], 151652)?,
                vision_end: config_i64(&config, &["vision_end_token_id", "image_end_token_id"], 151653)?,
                merge_size: p.merge_size,
            },
            ImageProcessor::Clip(_) => {
                let vision = crate::model::config::vision_view(&config)
                    .with_context(|| format!("{}: no vision_config", config_path.display()))?;
                let strategy =
                    config.get("vision_feature_select_strategy").and_then(Value::as_str).unwrap_or("default");
                ImageTokens::Llava {
                    image: config_i64(&config, &["image_token_index", "image_token_id"], 32000)?,
                    patch_size: vision.usize(&["patch_size"])?,
                    keeps_cls: strategy == "full",
                }
            }
        };
        let template = ChatTemplate::load(model_dir)?;
        Ok(VisionModel { dir: model_dir.to_path_buf(), processor, tokens, vocab_size, tokenizer, template })
    }

    /// The image token id.
    pub fn image_token(&self) -> i64 {
        match self.tokens {
            ImageTokens::Qwen { image, .. }
            | ImageTokens::Llava { image, .. }
            | ImageTokens::InternVl { image, .. } => image,
            ImageTokens::QwenVl { pad, .. } => pad,
        }
    }

    /// How many image tokens the language model sees for a processed image.
    pub fn num_image_tokens(&self, img: &ProcessedImage) -> usize {
        match &self.tokens {
            ImageTokens::Qwen { merge_size, .. } => {
                img.grid_thw.map_or(0, |g| g.iter().product::<usize>() / (merge_size * merge_size))
            }
            ImageTokens::Llava { patch_size, keeps_cls, .. } => {
                let (h, w) = (img.shape[2], img.shape[3]);
                (h / patch_size) * (w / patch_size) + usize::from(*keeps_cls)
            }
            ImageTokens::InternVl { tokens_per_tile, .. } => img.shape[0] * tokens_per_tile,
            ImageTokens::QwenVl { n_queries, .. } => img.shape[0] * n_queries,
        }
    }

    fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| missing_tokenizer(&self.dir))
    }

    /// The text that stands for one image in a prompt (`<|vision_start|><|image_pad|><|vision_end|>`
    /// for Qwen, `<image>\n` for LLaVA) and the image token's own text, named by the tokenizer.
    /// Qwen-VL's `qwen.tiktoken` spells the image's path between `<img>` and `</img>`, as its
    /// `from_list_format` does (the file name when the path is longer than the image's span).
    pub fn image_placeholder(&self, image: &Path) -> Result<(String, String)> {
        let tokenizer = self.tokenizer()?;
        let name = |id: i64| {
            tokenizer
                .id_to_token(id)
                .with_context(|| format!("{}: has no token for id {id} (from config.json)", tokenizer.path.display()))
        };
        let (placeholder, image) = match self.tokens {
            ImageTokens::Qwen { image, vision_start, vision_end, .. } => {
                (format!("{}{}{}", name(vision_start)?, name(image)?, name(vision_end)?), name(image)?)
            }
            ImageTokens::Llava { image, .. } => (format!("{}\n", name(image)?), name(image)?),
            // InternVL's chat puts `<image>\n` before the question and replaces `<image>` by this.
            ImageTokens::InternVl { image, start, end, wrap: false, .. } => {
                (format!("{}{}{}\n", name(start)?, name(image)?, name(end)?), name(image)?)
            }
            // The -hf chat templates put `<IMG_CONTEXT>\n` for an image part; the processor wraps it.
            ImageTokens::InternVl { image, wrap: true, .. } => (format!("{}\n", name(image)?), name(image)?),
            // Qwen-VL's query format (tokenization_qwen.py `from_list_format`): `Picture 1:<img>…</img>\n`.
            ImageTokens::QwenVl { start, end, pad, .. } => {
                let inner = match tokenizer.qwen_vl_image_tags() {
                    Some(tags) => image_reference(image, tags.span),
                    None => name(pad)?,
                };
                (format!("Picture 1:{}{inner}{}\n", name(start)?, name(end)?), name(start)?)
            }
        };
        Ok((placeholder, image))
    }

    /// The prompt for one image and a user text, rendered with the chat template (see
    /// [`image_prompt`]); the image placeholder is not expanded yet.
    pub fn render_prompt(&self, image: &Path, text: &str) -> Result<String> {
        let (placeholder, image) = self.image_placeholder(image)?;
        image_prompt(self.template.as_ref(), &placeholder, &image, text)
    }

    /// Token ids of a rendered prompt, as the processor tokenizes it.
    pub fn encode_rendered(&self, prompt: &str) -> Result<Vec<i64>> {
        self.tokenizer()?.encode_prompt(prompt)
    }

    /// The prompt's image placeholder expanded to `count` image tokens. transformers' InternVLProcessor
    /// (`-hf`) writes `<img>` + the tokens + `</img>` for each `<IMG_CONTEXT>` of the text
    /// (`replace_image_token`); a pre-tokenized prompt that already has them around its placeholder
    /// is taken as written. Qwen-VL: the span between `<img>` and `</img>` fitted to `count` positions
    /// ([`fit_qwen_vl_image`]).
    pub fn expand(&self, ids: &[i64], count: usize) -> Result<Vec<i64>> {
        if let ImageTokens::QwenVl { start, end, pad, .. } = self.tokens {
            return fit_qwen_vl_image(ids, start, end, pad, count);
        }
        let image = self.image_token();
        let expanded = expand_image_tokens(ids, image, count)?;
        let ImageTokens::InternVl { start, end, wrap: true, .. } = self.tokens else {
            return Ok(expanded);
        };
        let first = expanded.iter().position(|&t| t == image).unwrap_or(0);
        let last = first + count;
        if first > 0 && expanded[first - 1] == start && expanded.get(last) == Some(&end) {
            return Ok(expanded);
        }
        let mut out = Vec::with_capacity(expanded.len() + 2);
        out.extend_from_slice(&expanded[..first]);
        out.push(start);
        out.extend_from_slice(&expanded[first..last]);
        out.push(end);
        out.extend_from_slice(&expanded[last..]);
        Ok(out)
    }

    /// Builds the sample for one image and prompt.
    pub fn sample(&self, image: &Path, prompt: &Prompt, origin: &str) -> Result<VisionSample> {
        let rgb = load_rgb(image).with_context(|| origin.to_string())?;
        let processed = self.processor.process(&rgb).with_context(|| format!("{origin}: {}", image.display()))?;
        let ids = match prompt {
            Prompt::Text(t) => self
                .render_prompt(image, t)
                .and_then(|p| self.encode_rendered(&p))
                .with_context(|| origin.to_string())?,
            Prompt::Ids(ids) => ids.clone(),
        };
        let input_ids = self.expand(&ids, self.num_image_tokens(&processed)).with_context(|| origin.to_string())?;
        check_vocab(&input_ids, self.vocab_size, origin)?;
        Ok(VisionSample {
            origin: origin.to_string(),
            input_ids,
            pixel_shape: processed.shape,
            pixel_values: processed.pixel_values,
            image_grid_thw: processed.grid_thw.map(|g| g.map(|x| x as i64)),
        })
    }
}

/// How Qwen-VL's prompt names an image between `<img>` and `</img>`: its path, or when that is
/// longer than the `span` bytes an image has there (or holds `<`, `>`), its file name cut to fit.
fn image_reference(image: &Path, span: usize) -> String {
    let path = image.to_string_lossy();
    if path.len() <= span && !path.contains(['<', '>']) {
        return path.into_owned();
    }
    let name = image.file_name().map(|f| f.to_string_lossy().replace(['<', '>'], "_")).unwrap_or_default();
    let mut out = String::new();
    for c in name.chars() {
        if out.len() + c.len_utf8() > span {
            break;
        }
        out.push(c);
    }
    out
}

/// Qwen-VL's one image of a prompt: `<img>`, `count` positions, `</img>`. Its tokenizer fills the
/// positions with the image path's bytes and image pads, which are kept (the image's features
/// replace all of them); a single `<imgpad>` between the tags (pre-tokenized ids, or a
/// `tokenizer.json`) is expanded to `count` pads.
fn fit_qwen_vl_image(ids: &[i64], start: i64, end: i64, pad: i64, count: usize) -> Result<Vec<i64>> {
    let opens: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == start).map(|(i, _)| i).collect();
    let [open] = opens[..] else {
        bail!("the prompt has {} image start tokens <img> (id {start}); one image per prompt", opens.len());
    };
    let Some(len) = ids[open + 1..].iter().position(|&t| t == end) else {
        bail!("the prompt's <img> (id {start}) is not closed by </img> (id {end})");
    };
    let inner = &ids[open + 1..open + 1 + len];
    if let Some(stray) = ids[open + len + 2..].iter().chain(&ids[..open]).find(|&&t| t == end || t == pad) {
        bail!("the prompt has image token {stray} outside its <img> ... </img>");
    }
    if inner == [pad] {
        return expand_image_tokens(ids, pad, count);
    }
    if inner.len() != count {
        bail!(
            "the prompt's image spans {} positions between <img> and </img>; the model's resampler gives \
             {count} (visual.n_queries)",
            inner.len()
        );
    }
    Ok(ids.to_vec())
}

/// InternVL releases leave the ids of `<IMG_CONTEXT>`, `<img>` and `</img>` to the tokenizer (the
/// chat scripts look them up); this copies them into `config` from the folder's `tokenizer.json`,
/// so that the image token is known wherever the config goes (the splice of image features, the
/// check that a text-only prompt holds no image token). Other models, configs that have the ids,
/// and folders without a tokenizer are left as they are.
pub fn complete_image_tokens(model_dir: &Path, config: &mut Value) -> Result<()> {
    if config.get("model_type").and_then(Value::as_str) != Some("internvl_chat") {
        return Ok(());
    }
    let keys =
        [("img_context_token_id", "<IMG_CONTEXT>"), ("img_start_token_id", "<img>"), ("img_end_token_id", "</img>")];
    if keys.iter().all(|(k, _)| config.get(*k).is_some_and(|v| v.is_i64())) || !TextTokenizer::exists(model_dir) {
        return Ok(());
    }
    let tokenizer = TextTokenizer::load(model_dir)?;
    for (key, token) in keys {
        if !config.get(key).is_some_and(|v| v.is_i64()) {
            if let Some(id) = tokenizer.token_to_id(token) {
                config[key] = Value::from(id);
            }
        }
    }
    Ok(())
}

/// Every sample of a vision-language calibration set, preprocessed for the model in
/// `model_dir` (see the module documentation for the accepted forms).
pub fn load_vision(model_dir: &Path, path: &Path, default_text: &str) -> Result<Vec<VisionSample>> {
    let model = VisionModel::load(model_dir)?;
    read_vision_set(path, default_text)?
        .iter()
        .map(|r| model.sample(r.image.as_ref().unwrap(), r.prompt.as_ref().unwrap(), &r.origin))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::load_all;
    use serde_json::json;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    /// A fresh scratch folder for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lamina-calib-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn reference_ids(name: &str) -> Vec<i64> {
        let r = load_all(&fixture(name).join("reference.safetensors")).unwrap();
        r["input_ids"].bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// The fixture's ids with the image's run of tokens collapsed to one placeholder token.
    fn collapsed(ids: &[i64], image_token: i64) -> Vec<i64> {
        let mut out: Vec<i64> = Vec::new();
        for &t in ids {
            if !(t == image_token && out.last() == Some(&image_token)) {
                out.push(t);
            }
        }
        out
    }

    fn assert_sample_matches_fixture(name: &str, s: &VisionSample) {
        let r = load_all(&fixture(name).join("reference.safetensors")).unwrap();
        assert_eq!(s.input_ids, reference_ids(name), "{name}: input_ids");
        assert_eq!(s.pixel_shape, r["pixel_values"].shape, "{name}");
        let want = r["pixel_values"].to_f32().unwrap();
        let err = s.pixel_values.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= 1e-5, "{name}: pixel_values max abs error {err}");
        if let Some(g) = s.image_grid_thw {
            let want: Vec<i64> =
                r["image_grid_thw"].bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(g.to_vec(), want, "{name}");
        }
    }

    /// Every VL fixture, from pre-tokenized prompts holding one image token, in the listing
    /// forms: a .jsonl file given directly, a folder with one .jsonl, and a folder with
    /// index.json whose image sits in a subfolder. The expansion and preprocessing must give the
    /// fixture's input_ids, pixel_values and image_grid_thw.
    #[test]
    fn fixtures_from_pretokenized_listings() {
        for name in [
            "qwen2_vl",
            "qwen2_5_vl",
            "qwen3_vl",
            "qwen3_vl_moe",
            "llava",
            "internvl_chat",
            "internvl_hf",
            "glm4v",
            "glm4v_moe",
        ] {
            let model = VisionModel::load(&fixture(name)).unwrap();
            let ids = collapsed(&reference_ids(name), model.image_token());
            assert_eq!(ids.iter().filter(|&&t| t == model.image_token()).count(), 1);

            let listing = scratch(&format!("{name}-listing"));
            std::fs::copy(fixture(name).join("image.png"), listing.join("photo.png")).unwrap();
            let line = json!({"image": "photo.png", "input_ids": ids}).to_string();
            std::fs::write(listing.join("prompts.jsonl"), format!("{line}\n\n")).unwrap();
            for path in [listing.join("prompts.jsonl"), listing.clone()] {
                let samples = load_vision(&fixture(name), &path, "unused").unwrap();
                assert_eq!(samples.len(), 1, "{name}: {}", path.display());
                assert_sample_matches_fixture(name, &samples[0]);
            }

            let indexed = scratch(&format!("{name}-index"));
            std::fs::create_dir_all(indexed.join("images")).unwrap();
            std::fs::copy(fixture(name).join("image.png"), indexed.join("images/a.png")).unwrap();
            let index = json!([{"image": "images/a.png", "input_ids": ids}]).to_string();
            std::fs::write(indexed.join("index.json"), index).unwrap();
            let samples = load_vision(&fixture(name), &indexed, "unused").unwrap();
            assert_sample_matches_fixture(name, &samples[0]);
            let tensors = samples[0].tensors();
            assert_eq!(tensors[0].1.shape, vec![1, reference_ids(name).len()]);
            std::fs::remove_dir_all(&listing).ok();
            std::fs::remove_dir_all(&indexed).ok();
        }
    }

    /// The realvocab fixture's prompt is random text around one image: decoded with the real
    /// Qwen tokenizer it reads as below. Rendering that prompt with one image placeholder and
    /// running the real tokenizer and the expansion must reproduce the reference ids exactly.
    #[test]
    fn realvocab_reference_prompt_is_reproduced() {
        let dir = fixture("qwen3_vl_realvocab");
        let model = VisionModel::load(&dir).unwrap();
        let (placeholder, image) = model.image_placeholder(&dir.join("image.png")).unwrap();
        assert_eq!(
            (placeholder.as_str(), image.as_str()),
            ("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>")
        );
        let prompt = format!(" katastatinuxsuch Marines{placeholder}_Redickness MAD números(imageosome\tloc");
        let ids = model.encode_rendered(&prompt).unwrap();
        let s = model.sample(&dir.join("image.png"), &Prompt::Ids(ids), "realvocab").unwrap();
        assert_sample_matches_fixture("qwen3_vl_realvocab", &s);
    }

    /// A folder of images with the default text through the real Qwen chat template (a
    /// text-only Qwen3 template, so the image placeholder goes into the text). Expected ids:
    /// transformers' `apply_chat_template` (Jinja2) on
    /// `[{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>What is unusual
    /// about this photograph?"}]` with `add_generation_prompt=True`, tokenized by transformers,
    /// then the image pad repeated 12 times (grid 1x6x8 / merge 2²).
    #[test]
    fn realvocab_image_folder_uses_the_chat_template() {
        let dir = fixture("qwen3_vl_realvocab");
        let images = scratch("realvocab-folder");
        std::fs::copy(dir.join("image.png"), images.join("b.png")).unwrap();
        std::fs::copy(dir.join("image.png"), images.join("a.PNG")).unwrap();
        std::fs::write(images.join("notes.md"), "not an image").unwrap();
        let samples = load_vision(&dir, &images, "What is unusual about this photograph?").unwrap();
        assert_eq!(samples.len(), 2);
        assert!(samples[0].origin.ends_with("a.PNG") && samples[1].origin.ends_with("b.png"));
        let mut want = vec![151644, 872, 198, 151652];
        want.extend([151655; 12]);
        want.extend([151653, 3838, 374, 18511, 911, 419, 10300, 30, 151645, 198, 151644, 77091, 198]);
        assert_eq!(samples[0].input_ids, want);
        assert_eq!(samples[0].image_grid_thw, Some([1, 6, 8]));
        std::fs::remove_dir_all(&images).ok();
    }

    /// A folder with one listing: entries in listing order, then the folder's images the listing
    /// does not mention, with the default text (msModelSlim's rule).
    #[test]
    fn listing_folder_adds_unmentioned_images() {
        let dir = scratch("unmentioned");
        for f in ["x.png", "y.jpg", "z.png"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        std::fs::write(dir.join("set.json"), r#"[{"image": "z.png", "text": "Zed?"}, {"image": "./x.png"}]"#).unwrap();
        let records = read_vision_set(&dir, "default").unwrap();
        let got: Vec<(String, Prompt)> = records
            .iter()
            .map(|r| {
                (
                    r.image.as_ref().unwrap().file_name().unwrap().to_string_lossy().into_owned(),
                    r.prompt.clone().unwrap(),
                )
            })
            .collect();
        let t = |s: &str| Prompt::Text(s.to_string());
        assert_eq!(
            got,
            vec![("z.png".into(), t("Zed?")), ("x.png".into(), t("default")), ("y.jpg".into(), t("default"))]
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_vision_sets_are_named() {
        let qwen = fixture("qwen2_vl");
        let err = |dir: &Path| format!("{:#}", load_vision(&qwen, dir, "Describe.").unwrap_err());

        // Text prompt without tokenizer.json.
        let d = scratch("no-tokenizer");
        std::fs::copy(qwen.join("image.png"), d.join("a.png")).unwrap();
        let e = err(&d);
        assert!(e.contains("qwen2_vl/tokenizer.json") && e.contains("missing"), "{e}");

        // Missing image.
        std::fs::write(d.join("list.jsonl"), "{\"image\": \"gone.png\", \"input_ids\": [1, 997, 2]}\n").unwrap();
        let e = err(&d);
        assert!(e.contains("list.jsonl:1") && e.contains("gone.png") && e.contains("does not exist"), "{e}");

        // Unsupported image type.
        std::fs::write(d.join("a.gif"), b"GIF89a").unwrap();
        std::fs::write(d.join("list.jsonl"), "{\"image\": \"a.gif\", \"input_ids\": [1, 997, 2]}\n").unwrap();
        let e = err(&d);
        assert!(e.contains("a.gif") && e.contains("not a supported image"), "{e}");

        // Corrupt image.
        std::fs::write(d.join("bad.png"), b"\x89PNG\r\n\x1a\nthis is not a PNG").unwrap();
        std::fs::write(d.join("list.jsonl"), "{\"image\": \"bad.png\", \"input_ids\": [1, 997, 2]}\n").unwrap();
        let e = err(&d);
        assert!(e.contains("bad.png"), "{e}");

        // Token id beyond the vocabulary (1000 in the fixture).
        std::fs::write(d.join("list.jsonl"), "{\"image\": \"a.png\", \"input_ids\": [1, 997, 1000]}\n").unwrap();
        let e = err(&d);
        assert!(e.contains("list.jsonl:1") && e.contains("1000") && e.contains("vocab"), "{e}");

        // No image token in a pre-tokenized prompt.
        std::fs::write(d.join("list.jsonl"), "{\"image\": \"a.png\", \"input_ids\": [1, 2]}\n").unwrap();
        assert!(err(&d).contains("no image token"));

        // Entry without an image; invalid JSON; empty listing.
        std::fs::write(d.join("list.jsonl"), "{\"text\": \"hello\"}\n").unwrap();
        assert!(err(&d).contains("has no \"image\""));
        std::fs::write(d.join("list.jsonl"), "{\"image\": \n").unwrap();
        assert!(err(&d).contains("list.jsonl:1: not valid JSON"));
        std::fs::write(d.join("list.jsonl"), "\n  \n").unwrap();
        assert!(err(&d).contains("empty"));

        // Two listings; both index files.
        std::fs::write(d.join("other.json"), "[]").unwrap();
        assert!(err(&d).contains("2 .json/.jsonl files"));
        std::fs::write(d.join("index.json"), "[]").unwrap();
        std::fs::write(d.join("index.jsonl"), "").unwrap();
        assert!(err(&d).contains("both index.json and index.jsonl"));

        // An empty folder; a path that does not exist.
        let empty = scratch("empty-folder");
        assert!(err(&empty).contains("no images"));
        assert!(err(&empty.join("nothing")).contains("no such calibration folder"));
        std::fs::remove_dir_all(&d).ok();
        std::fs::remove_dir_all(&empty).ok();
    }

    /// A hand-written word-level tokenizer whose post-processor puts `<s>` (id 0) before every
    /// text, like Llama's.
    /// A release config without the image token ids: they come from the tokenizer, for the
    /// config (complete_image_tokens) and for the prompts (VisionModel), and the text prompt is
    /// `<img>` + one IMG_CONTEXT per image token + `</img>` + newline + the text.
    #[test]
    fn internvl_image_tokens_come_from_the_tokenizer() {
        let dir = scratch("internvl-tokenizer");
        for f in ["config.json", "model.safetensors", "image.png"] {
            std::fs::copy(fixture("internvl_chat").join(f), dir.join(f)).unwrap();
        }
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        for k in ["img_context_token_id", "img_start_token_id", "img_end_token_id"] {
            config.as_object_mut().unwrap().remove(k);
        }
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        assert!(VisionModel::load(&dir).is_err(), "no ids anywhere");
        // <s>=0, <unk>=1, then the words from 2.
        word_tokenizer(&dir, &["<img>", "</img>", "<IMG_CONTEXT>", "Describe", "it"]);
        // The three image tokens are added (special) tokens, as in the releases' tokenizer.json.
        let path = dir.join("tokenizer.json");
        let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for (id, t) in [(2, "<img>"), (3, "</img>"), (4, "<IMG_CONTEXT>")] {
            tok["added_tokens"].as_array_mut().unwrap().push(json!({"id": id, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
        std::fs::write(&path, tok.to_string()).unwrap();
        let mut completed = config.clone();
        complete_image_tokens(&dir, &mut completed).unwrap();
        assert_eq!(
            [
                completed["img_start_token_id"].as_i64(),
                completed["img_end_token_id"].as_i64(),
                completed["img_context_token_id"].as_i64()
            ],
            [Some(2), Some(3), Some(4)]
        );
        let model = VisionModel::load(&dir).unwrap();
        let s = model.sample(&dir.join("image.png"), &Prompt::Text("Describe it".into()), "test").unwrap();
        // Three tiles (two and the thumbnail) of 4 tokens.
        let mut want = vec![0, 2];
        want.extend([4; 12]);
        want.extend([3, 5, 6]);
        assert_eq!(s.input_ids, want);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// transformers' `-hf` InternVL processor on the real photographs: the chat template's image part
    /// `<IMG_CONTEXT>\n` becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`,
    /// the ids of the three tokens coming from the tokenizer (config.json has only image_token_id),
    /// with the real Qwen3 tokenizer: the ids equal InternVLProcessor's
    /// (tests/fixtures/real_photos/internvl_hf_tokens.json, made by tests/fixtures/gen/internvl_hf.py).
    #[test]
    fn internvl_hf_prompts_are_transformers_processor_ids() {
        let reference = read_json(&fixture("real_photos/internvl_hf_tokens.json")).unwrap();
        let mut tokenizer = read_json(&fixture("qwen3_vl_realvocab/tokenizer.json")).unwrap();
        let added = reference["added_tokens"].as_object().unwrap();
        for (token, id) in added {
            tokenizer["added_tokens"].as_array_mut().unwrap().push(json!({"id": id, "content": token,
                "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
        let photos = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images");
        let hf = fixture("internvl_hf");
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4);
        for case in cases {
            let (size, photo) = (case["image_size"].as_u64().unwrap(), case["photo"].as_str().unwrap());
            let dir = scratch(&format!("internvl-hf-tokens-{photo}-{size}"));
            std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
            let template = json!({"chat_template": reference["chat_template"]});
            std::fs::write(dir.join("tokenizer_config.json"), template.to_string()).unwrap();
            let mut config = read_json(&hf.join("config.json")).unwrap();
            config["vision_config"]["image_size"] = json!([size, size]);
            config["image_token_id"] = added["<IMG_CONTEXT>"].clone();
            config["text_config"]["vocab_size"] = json!(151936);
            let map = config.as_object_mut().unwrap();
            map.remove("img_start_token_id");
            map.remove("img_end_token_id");
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            let mut pre = read_json(&hf.join("preprocessor_config.json")).unwrap();
            pre["size"] = json!({"height": size, "width": size});
            pre["max_patches"] = case["max_patches"].clone();
            std::fs::write(dir.join("preprocessor_config.json"), pre.to_string()).unwrap();

            let model = VisionModel::load(&dir).unwrap();
            let prompt = Prompt::Text(case["prompt"].as_str().unwrap().to_string());
            let sample = model.sample(&photos.join(photo), &prompt, photo).unwrap();
            let want: Vec<i64> = case["input_ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(sample.pixel_shape[0] as u64, case["tiles"].as_u64().unwrap(), "{photo} {size}: tiles");
            assert_eq!(sample.input_ids, want, "{photo} {size}: input_ids");
        }
    }

    fn word_tokenizer(dir: &Path, words: &[&str]) {
        let mut vocab = serde_json::Map::new();
        vocab.insert("<s>".into(), json!(0));
        vocab.insert("<unk>".into(), json!(1));
        for (i, w) in words.iter().enumerate() {
            vocab.insert(w.to_string(), json!(i + 2));
        }
        let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
        let tok = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {"type": "TemplateProcessing",
                "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}},
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    }

    #[test]
    fn text_is_concatenated_then_cut_with_bos_per_window() {
        let words = ["the", "cat", "sat", "on", "a", "mat", "."];
        let dir = scratch("text-bos");
        word_tokenizer(&dir, &words);
        let id = |w: &str| words.iter().position(|x| *x == w).unwrap() as i64 + 2;
        let text = "the cat sat on a mat .\n\nthe mat sat on a cat .";
        std::fs::write(dir.join("corpus.txt"), text).unwrap();
        let expect: Vec<i64> = text.split_whitespace().map(id).collect();
        let got = load_text(&dir, &dir.join("corpus.txt"), 3, 5, 100).unwrap();
        assert_eq!(got.len(), 3);
        for (i, w) in got.iter().enumerate() {
            assert_eq!(w[0], 0, "window {i} starts with <s>");
            assert_eq!(&w[1..], &expect[4 * i..4 * i + 4]);
        }
        // The same words as JSONL records (text and pre-tokenized mixed) give the same stream.
        let lines = [
            json!({"text": "the cat sat on a mat ."}).to_string(),
            json!("the mat sat on").to_string(),
            json!({"input_ids": [id("a"), id("cat"), id(".")]}).to_string(),
        ];
        std::fs::write(dir.join("corpus.jsonl"), lines.join("\n")).unwrap();
        assert_eq!(load_text(&dir, &dir.join("corpus.jsonl"), 3, 5, 100).unwrap(), got);
        // Too few tokens: 14 words cannot fill 4 windows of 4.
        let e = format!("{:#}", load_text(&dir, &dir.join("corpus.txt"), 4, 5, 100).unwrap_err());
        assert!(e.contains("corpus.txt") && e.contains("14 tokens") && e.contains("16 needed"), "{e}");
        // The vocabulary of config.json is smaller than the tokenizer's.
        let e = format!("{:#}", load_text(&dir, &dir.join("corpus.txt"), 1, 5, 5).unwrap_err());
        assert!(e.contains("outside the vocabulary"), "{e}");
        // A window must hold more than the BOS.
        assert!(load_text(&dir, &dir.join("corpus.txt"), 1, 1, 100).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn pretokenized_text_needs_no_tokenizer() {
        let dir = scratch("text-ids");
        let lines: Vec<String> = (0..3)
            .map(|i| json!({"input_ids": (0..10).map(|t| i * 10 + t).collect::<Vec<i64>>()}).to_string())
            .collect();
        std::fs::write(dir.join("ids.jsonl"), lines.join("\n")).unwrap();
        // The qwen3 fixture has no tokenizer.json; pre-tokenized ids are used verbatim.
        let got = load_text(&fixture("qwen3"), &dir.join("ids.jsonl"), 2, 12, 1000).unwrap();
        assert_eq!(got, vec![(0..12).collect::<Vec<i64>>(), (12..24).collect()]);
        let e = format!("{:#}", load_text(&fixture("qwen3"), &dir.join("ids.jsonl"), 1, 8, 25).unwrap_err());
        assert!(e.contains("ids.jsonl:3") && e.contains("token id 25"), "{e}");
        std::fs::write(dir.join("neg.jsonl"), "{\"input_ids\": [3, -1]}").unwrap();
        assert!(
            format!("{:#}", load_text(&fixture("qwen3"), &dir.join("neg.jsonl"), 1, 1, 25).unwrap_err()).contains("-1")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bad_text_files_are_named() {
        let dir = scratch("text-bad");
        let qwen3 = fixture("qwen3");
        std::fs::write(dir.join("empty.txt"), " \n").unwrap();
        let e = format!("{:#}", load_text(&qwen3, &dir.join("empty.txt"), 1, 8, 1000).unwrap_err());
        assert!(e.contains("empty.txt") && e.contains("empty"), "{e}");
        std::fs::write(dir.join("empty.jsonl"), "").unwrap();
        let e = format!("{:#}", load_text(&qwen3, &dir.join("empty.jsonl"), 1, 8, 1000).unwrap_err());
        assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
        std::fs::write(dir.join("words.txt"), "some words").unwrap();
        let e = format!("{:#}", load_text(&qwen3, &dir.join("words.txt"), 1, 8, 1000).unwrap_err());
        assert!(e.contains("qwen3/tokenizer.json") && e.contains("missing"), "{e}");
        std::fs::write(dir.join("bad.jsonl"), "{\"text\": 3}").unwrap();
        let e = format!("{:#}", load_text(&qwen3, &dir.join("bad.jsonl"), 1, 8, 1000).unwrap_err());
        assert!(e.contains("bad.jsonl:1") && e.contains("not a string"), "{e}");
        let e = format!("{:#}", load_text(&qwen3, &dir.join("missing.txt"), 1, 8, 1000).unwrap_err());
        assert!(e.contains("missing.txt") && e.contains("no such calibration file"), "{e}");
        let e = format!("{:#}", load_text(&qwen3, &dir, 1, 8, 1000).unwrap_err());
        assert!(e.contains("is a folder"), "{e}");
        assert!(load_text(&qwen3, &dir.join("words.txt"), 0, 8, 1000).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    fn qwen_tiktoken_expected() -> Value {
        let path = fixture("qwen_tiktoken/small.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// A copy of a fixture's config.json (and image) beside the small qwen.tiktoken of
    /// tests/fixtures/qwen_tiktoken: a Qwen (1) / Qwen-VL folder without tokenizer.json.
    fn with_qwen_tiktoken(name: &str) -> PathBuf {
        let dir = scratch(&format!("{name}-tiktoken"));
        std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).unwrap();
        std::fs::copy(fixture("qwen_tiktoken/qwen.tiktoken"), dir.join("qwen.tiktoken")).unwrap();
        dir
    }

    /// Qwen-VL without tokenizer.json: an image and a text become tokenization_qwen.py's ids of
    /// `from_list_format([{"image": "image.png"}, {"text": ...}])` with the qwen_vl fixture's 16
    /// image positions (tests/fixtures/gen/qwen_tiktoken.py); the image's absolute path is longer
    /// than 16 bytes, so the prompt names its file. The sample's span fits the resampler.
    #[test]
    fn qwen_vl_prompts_through_qwen_tiktoken() {
        let dir = with_qwen_tiktoken("qwen_vl");
        let want = qwen_tiktoken_expected();
        let model = VisionModel::load(&dir).unwrap();
        let image = fixture("qwen_vl").join("image.png");
        assert_eq!(
            model.render_prompt(&image, "Describe this image in detail.").unwrap(),
            want["queries"][0].as_str().unwrap()
        );
        let s = model.sample(&image, &Prompt::Text("Describe this image in detail.".into()), "q").unwrap();
        let expected: Vec<i64> = serde_json::from_value(want["qwen_vl_queries_16"][0].clone()).unwrap();
        assert_eq!(s.input_ids, expected);
        assert_eq!(
            crate::model::vision::splice::ImageSlots::of(&read_json(&dir.join("config.json")).unwrap())
                .unwrap()
                .positions(&s.input_ids)
                .unwrap()
                .len(),
            16
        );
        // Pre-tokenized ids with one <imgpad> still expand.
        let s = model.sample(&image, &Prompt::Ids(vec![5, 990, 992, 991, 7]), "ids").unwrap();
        assert_eq!(s.input_ids.len(), 20);
        let e = format!("{:#}", model.sample(&image, &Prompt::Ids(vec![5, 990, 992, 992, 991]), "two").unwrap_err());
        assert!(e.contains("2 positions") && e.contains("16"), "{e}");
        // A vocabulary whose <img> is not the config's image_start_id.
        let mut config = read_json(&dir.join("config.json")).unwrap();
        config["visual"]["image_start_id"] = json!(995);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let e = format!("{:#}", VisionModel::load(&dir).err().unwrap());
        assert!(e.contains("qwen.tiktoken") && e.contains("image_start_id 995") && e.contains("990"), "{e}");
        // Neither tokenizer.json nor qwen.tiktoken.
        std::fs::remove_file(dir.join("qwen.tiktoken")).unwrap();
        let e = format!("{:#}", TextTokenizer::load(&dir).err().unwrap());
        assert!(e.contains("tokenizer.json: missing") && e.contains("qwen.tiktoken"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Qwen (1) text calibration without tokenizer.json: the windows are tiktoken's ids of the text
    /// (Qwen (1)'s special tokens from 151643), as tests/fixtures/gen/qwen_tiktoken.py computed them.
    #[test]
    fn qwen1_text_through_qwen_tiktoken() {
        let dir = with_qwen_tiktoken("qwen1");
        let want = qwen_tiktoken_expected();
        for i in [2, 6, 8] {
            let text = want["cases"][i].as_str().unwrap();
            let ids: Vec<i64> = serde_json::from_value(want["qwen1"][i].clone()).unwrap();
            std::fs::write(dir.join("corpus.txt"), text).unwrap();
            let got = load_text(&dir, &dir.join("corpus.txt"), 1, ids.len(), 1000).unwrap();
            assert_eq!(got, vec![ids], "{text:?}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The shipped defaults: calib/ as a folder with one listing, calib/images as a folder of
    /// images, and the text corpus, through the real Qwen tokenizer.
    #[test]
    fn default_calibration_set_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib");
        let records = read_vision_set(&root, crate::data::DEFAULT_IMAGE_TEXT).unwrap();
        assert_eq!(records.len(), 4);
        assert!(records
            .iter()
            .all(|r| matches!(&r.prompt, Some(Prompt::Text(t)) if t != crate::data::DEFAULT_IMAGE_TEXT)));
        assert_eq!(read_vision_set(&root.join("images"), "d").unwrap().len(), 4);

        let dir = fixture("qwen3_vl_realvocab");
        let samples = load_vision(&dir, &root.join("prompts.jsonl"), "d").unwrap();
        assert_eq!(samples.len(), 4);
        for s in &samples {
            let g = s.image_grid_thw.unwrap();
            assert_eq!(s.input_ids.iter().filter(|&&t| t == 151655).count() as i64, g[0] * g[1] * g[2] / 4);
            assert_eq!(s.pixel_shape, vec![(g[1] * g[2]) as usize, 1536]);
        }
        let tok = TextTokenizer::load(&dir).unwrap();
        let corpus = root.join("text/corpus.txt");
        // The README promises 32 sequences of 512 tokens.
        let windows = load_text(&dir, &corpus, 32, 512, 151936).unwrap();
        assert!(windows.iter().all(|w| w.len() == 512));
        let all = tok.encode(&std::fs::read_to_string(&corpus).unwrap(), false).unwrap();
        assert_eq!(windows.concat(), all[..32 * 512]);
    }
}
