//! lamina quantizes huge language and vision-language models one layer at a time, in bounded
//! memory, resumably. See README.md for the design; the modules follow the data:
//!
//! - [`io`]: checkpoints in, shards and the resume journal out.
//! - [`data`]: calibration data: images, prompts and text into model inputs.
//! - [`model`]: families, naming rules, units, fused-expert splitting.
//! - [`quant`]: recipes, schemes and rounding algorithms.
//! - [`export`]: output formats (Ascend / msModelSlim).
//! - [`pipeline`]: the plan and the streaming stages.
//! - [`device`]: the compute boundary (CPU).

pub mod cli;
pub mod data;
pub mod device;
pub mod export;
pub mod io;
pub mod model;
pub mod pipeline;
pub mod quant;
pub mod tensor;
