//! Quantization: what a linear becomes (`spec`), the recipes that decide it (`recipe`), and the
//! rounding algorithms (`rtn`).

pub mod glob;
pub mod recipe;
pub mod rtn;
pub mod spec;

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
