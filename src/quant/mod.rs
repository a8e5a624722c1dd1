//! Quantization: what a linear becomes (`spec`), the recipes that decide it (`recipe`), the
//! rounding algorithms (`rtn`, `gptq`), and calibration: statistics at each linear's input
//! (`observer`), activation ranges (`act_range`) and outlier suppression (`smooth`).

pub mod act_range;
pub mod glob;
pub mod gptq;
pub mod observer;
pub mod recipe;
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
    pub bias: Option<Vec<f32>>,
    /// Present for static activation schemes.
    pub input: Option<ActRange>,
}
