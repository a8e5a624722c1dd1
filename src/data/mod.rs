//! Calibration data turned into model inputs: images decoded and preprocessed exactly as the
//! models' Hugging Face processors do, prompts rendered with the model's chat template and
//! tokenized with its `tokenizer.json` (or Qwen's `qwen.tiktoken`), and the calibration sets read from disk.
//!
//! - [`image`]: decoding (PNG, JPEG), EXIF orientation, RGB conversion.
//! - [`resample`]: Pillow's resize, bit for bit.
//! - [`processor`]: the Qwen2-VL family and CLIP (LLaVA) image processors.
//! - [`prompt`]: chat templates, tokenizer, image-token expansion.
//! - [`tiktoken`]: Qwen (1) and Qwen-VL's `qwen.tiktoken`, tokenized as tiktoken does.
//! - [`calib`]: the calibration sets: [`calib::load_text`] and [`calib::load_vision`].

pub mod calib;
pub mod image;
pub mod processor;
pub mod prompt;
pub mod resample;
pub mod tiktoken;

/// msModelSlim's default prompt for images listed without text.
pub const DEFAULT_IMAGE_TEXT: &str = "Describe this image in detail.";
