//! Quantization: what a linear becomes (`spec`), the recipes that decide it (`recipe`), the
//! rounding algorithms (`rtn`, `gptq`), and calibration: statistics at each linear's input
//! (`observer`), activation ranges (`act_range`), outlier suppression (`smooth`) and the int8 KV cache
//! (`kv_cache`).

pub mod act_range;
pub mod act_sim;
pub mod awq;
pub mod glob;
pub mod gptq;
pub mod kv_cache;
pub mod observer;
pub mod recipe;
pub mod rotation;
pub mod rtn;
pub mod smooth;
pub mod smooth_search;
pub mod spec;
#[cfg(test)]
mod testutil;

pub use recipe::Recipe;
pub use rtn::QuantizedWeight;
pub use spec::{ActQuant, QuantSpec};

/// A static activation quantizer: `q = round(x / scale + offset)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActRange {
    pub scale: f32,
    pub offset: f32,
}

/// One linear layer after quantization, independent of the output format.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedLinear {
    pub spec: QuantSpec,
    pub weight: QuantizedWeight,
    /// The full bias the linear computes with (static schemes fold it into `quant_bias`).
    pub bias: Option<Vec<f32>>,
    /// Whether `bias` is written as a tensor: true when the checkpoint's linear had one. A bias
    /// that only smoothing created lives in `quant_bias` alone.
    pub write_bias: bool,
    /// Present for static activation schemes.
    pub input: Option<ActRange>,
}
