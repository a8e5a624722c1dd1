//! How a quantized linear's input is rounded at inference, simulated in float (calibration's
//! error propagation, `lamina eval`, reading an output back).

use crate::quant::{act_range, ActRange};
use ndarray::{Array2, ArrayView2};

/// How a quantized linear's input is quantized at inference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActSim {
    /// Weight-only schemes.
    None,
    /// Per token, symmetric, `bits` wide (8, or 4 for W4A4): scale `max|x_t| / (2^(bits-1) - 1)`,
    /// integers clamped to the signed range.
    PerToken { bits: u8 },
    /// int8 per tensor with a calibrated scale and offset.
    Static(ActRange),
}

impl ActSim {
    /// The activations as the quantized kernel sees them.
    pub fn apply(&self, x: ArrayView2<f32>) -> Array2<f32> {
        match *self {
            ActSim::None => x.to_owned(),
            ActSim::Static(r) => x.mapv(|v| act_range::fake_quantize(v, r)),
            ActSim::PerToken { bits } => {
                let qmax = ((1i32 << (bits - 1)) - 1) as f32;
                let mut out = x.to_owned();
                for mut row in out.rows_mut() {
                    let absmax = row.fold(0f32, |m, v| m.max(v.abs()));
                    if absmax > 0.0 {
                        let s = absmax / qmax;
                        row.mapv_inplace(|v| (v / s).round_ties_even().clamp(-qmax - 1.0, qmax) * s);
                    }
                }
                out
            }
        }
    }
}
