//! How one linear layer is quantized: a recipe's `qconfig`, and the scheme name it amounts to.

use anyhow::{bail, Result};
use serde::Deserialize;

/// How activations are quantized at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// Weights only: activations stay in float.
    None,
    /// int8 per token, computed at run time: nothing to calibrate.
    PerToken,
    /// int8 per tensor with a calibrated scale and offset.
    PerTensorStatic { symmetric: bool },
}

/// How activation ranges are measured for static schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActMethod {
    MinMax,
    Histogram,
}

/// How weights are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightMethod {
    /// Round to nearest with min-max scales.
    MinMax,
    /// GPTQ: error-compensating rounding with the layer's Hessian.
    Gptq,
}

/// How msModelSlim's "lowbit" sparse quantization (W8A8S) picks the outliers of a weight row
/// that may leave the 4-bit range: stored as parts per million / thousandths so that a spec stays
/// `Eq + Hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outliers {
    /// The largest `ppm / 1e6` of each row's magnitudes (msModelSlim's `fraction`).
    Fraction { ppm: u32 },
    /// Values farther than `milli / 1000` standard deviations from the row's mean
    /// (msModelSlim's `use_sigma` with `sigma_factor`).
    Sigma { milli: u32 },
}

impl Outliers {
    /// msModelSlim's default: `fraction` 0.01.
    pub const DEFAULT: Outliers = Outliers::Fraction { ppm: 10_000 };
}

/// One linear's quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub weight_bits: u8,
    /// `None` for per output channel.
    pub group_size: Option<usize>,
    /// Symmetric weights (`w ≈ q·s`, `q` in `±qmax`) or asymmetric (`w ≈ (q − z)·s` with a zero
    /// point `z` per group, `q` over the whole signed range).
    pub weight_symmetric: bool,
    pub weight_method: WeightMethod,
    /// GPTQ: quantize the columns in decreasing order of their Hessian diagonal (activation
    /// order). The group scales are fixed up front from the original weight's contiguous groups,
    /// so the output has the ordinary per-group layout and needs no group index to load.
    pub act_order: bool,
    /// Quantize a layer's linears stage by stage (q/k/v, then o, then gate/up, then down), each
    /// stage calibrated on the inputs the already quantized stages produce.
    pub true_sequential: bool,
    pub act: ActQuant,
    /// Bits of the per-token dynamic activations (8, or 4 for W4A4).
    pub act_bits: u8,
    pub act_method: ActMethod,
    /// W8A8S: int8 weights whose per-channel scale comes from a 4-bit range over the row's
    /// inliers; the outliers keep their int8 values beyond it.
    pub lowbit: Option<Outliers>,
}

impl QuantSpec {
    /// The Ascend description type of this scheme.
    pub fn ascend_type(&self) -> &'static str {
        match (self.weight_bits, self.act, self.act_bits) {
            (8, ActQuant::None, _) => "W8A16",
            (8, ActQuant::PerToken, _) => "W8A8_DYNAMIC",
            (8, ActQuant::PerTensorStatic { .. }, _) if self.lowbit.is_some() => "W8A8S",
            (8, ActQuant::PerTensorStatic { .. }, _) => "W8A8",
            (4, ActQuant::PerToken, 4) => "W4A4_DYNAMIC",
            (4, ActQuant::PerToken, _) => "W4A8_DYNAMIC",
            (4, ActQuant::None, _) => "W4A16",
            _ => unreachable!("validated when the spec was built"),
        }
    }

    /// The largest quantized magnitude of symmetric weights (127 for int8, 7 for int4).
    pub fn qmax(&self) -> i32 {
        (1 << (self.weight_bits - 1)) - 1
    }

    /// The integer range of the weights: `±qmax` when symmetric, the whole signed range
    /// (`-128..=127`, `-8..=7`) when asymmetric.
    pub fn q_range(&self) -> (i32, i32) {
        if self.weight_symmetric {
            (-self.qmax(), self.qmax())
        } else {
            (-(1 << (self.weight_bits - 1)), self.qmax())
        }
    }

    pub fn needs_calibration(&self) -> bool {
        matches!(self.act, ActQuant::PerTensorStatic { .. }) || self.weight_method == WeightMethod::Gptq
    }

    /// The group length along the input dimension for a linear with `cols` inputs.
    pub fn group_len(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).min(cols).max(1)
    }

    /// int8 per-channel symmetric round-to-nearest weights, float activations: the base every
    /// preset and qconfig starts from.
    pub const W8A16: QuantSpec = QuantSpec {
        weight_bits: 8,
        group_size: None,
        weight_symmetric: true,
        weight_method: WeightMethod::MinMax,
        act_order: false,
        true_sequential: false,
        act: ActQuant::None,
        act_bits: 8,
        act_method: ActMethod::MinMax,
        lowbit: None,
    };

    /// The named `--quant_type` presets.
    pub fn preset(name: &str) -> Option<QuantSpec> {
        let base = QuantSpec::W8A16;
        Some(match name {
            "w8a16" => base,
            "w8a8_dynamic" => QuantSpec { act: ActQuant::PerToken, ..base },
            "w8a8" => QuantSpec { act: ActQuant::PerTensorStatic { symmetric: false }, ..base },
            "w4a8_dynamic" => QuantSpec { weight_bits: 4, act: ActQuant::PerToken, ..base },
            "w4a16" => QuantSpec { weight_bits: 4, group_size: Some(128), ..base },
            _ => return None,
        })
    }

    /// Builds a spec from msModelSlim's `qconfig` block.
    ///
    /// Besides msModelSlim's W8A16 / W8A8 / W8A8_DYNAMIC / W4A8_DYNAMIC / W4A16 forms:
    /// - `weight.symmetric: false` (weight-only schemes): asymmetric weights with zero points;
    /// - `weight.dtype: int4` with static per-tensor int8 activations is msModelSlim's sparse
    ///   quantization (`w_bit 4, a_bit 8, is_lowbit`): W8A8S, int8 weights on a 4-bit scale with
    ///   outliers kept; `ext.fraction` (default 0.01), or `ext.use_sigma` with `ext.sigma_factor`
    ///   (default 3), choose the outliers;
    /// - `act.dtype: int4` per token with int4 per-channel weights: W4A4_DYNAMIC;
    /// - `ext.act_order`, `ext.true_sequential` for GPTQ.
    pub fn from_qconfig(q: &QConfig) -> Result<QuantSpec> {
        let w = &q.weight;
        let ext = w.ext.clone().unwrap_or_default();
        let mut weight_bits = match w.dtype.as_str() {
            "int8" => 8,
            "int4" => 4,
            other => bail!("weight dtype {other:?} is not supported (int8, int4)"),
        };
        let group_size = match w.scope.as_str() {
            "per_channel" => ext.group_size.filter(|_| weight_bits == 4 && q.act.is_none()),
            "per_group" => Some(ext.group_size.or(w.group_size).unwrap_or(128)),
            other => bail!("weight scope {other:?} is not supported (per_channel, per_group)"),
        };
        if group_size == Some(0) {
            bail!("weight group_size must be positive");
        }
        let weight_method = match w.method.as_deref().unwrap_or("minmax") {
            "minmax" | "ssz" | "lowbit" => WeightMethod::MinMax,
            "gptq" => WeightMethod::Gptq,
            other => bail!("weight method {other:?} is not supported (minmax, gptq, lowbit)"),
        };
        if (ext.act_order || ext.true_sequential) && weight_method != WeightMethod::Gptq {
            bail!("act_order and true_sequential are GPTQ settings (weight.method: gptq)");
        }
        let (act, act_bits, act_method) = match &q.act {
            None => (ActQuant::None, 8, ActMethod::MinMax),
            Some(a) => {
                let bits = match a.dtype.as_str() {
                    "int8" => 8,
                    "int4" => 4,
                    other => bail!("activation dtype {other:?} is not supported (int8, int4)"),
                };
                let act = match a.scope.as_str() {
                    "per_token" => ActQuant::PerToken,
                    "per_tensor" => ActQuant::PerTensorStatic { symmetric: a.symmetric.unwrap_or(false) },
                    other => {
                        bail!("activation scope {other:?} is not supported (per_token, per_tensor)")
                    }
                };
                if bits == 4 && act != ActQuant::PerToken {
                    bail!("int4 activations are quantized per token (scope per_token), as W4A4_DYNAMIC");
                }
                let method = match a.method.as_deref().unwrap_or("minmax") {
                    "minmax" => ActMethod::MinMax,
                    "histogram" => ActMethod::Histogram,
                    other => {
                        bail!("activation method {other:?} is not supported (minmax, histogram)")
                    }
                };
                (act, bits, method)
            }
        };
        let weight_symmetric = w.symmetric.unwrap_or(true);
        if !weight_symmetric && act != ActQuant::None {
            bail!("asymmetric weights are written for weight-only schemes (W8A16, W4A16); set weight.symmetric: true");
        }
        let mut lowbit = None;
        if weight_bits == 4 && matches!(act, ActQuant::PerTensorStatic { .. }) {
            // msModelSlim's sparse quantization: a 4-bit scale, int8 storage (W8A8S).
            if group_size.is_some() {
                bail!("W8A8S (int4 weights with static int8 activations) is per channel; use scope per_channel");
            }
            lowbit = Some(if ext.use_sigma {
                let f = ext.sigma_factor.unwrap_or(3.0);
                if !(f > 0.0 && f.is_finite()) {
                    bail!("sigma_factor must be positive, not {f}");
                }
                Outliers::Sigma { milli: (f * 1000.0).round() as u32 }
            } else {
                let f = ext.fraction.unwrap_or(0.01);
                if !(0.0..1.0).contains(&f) {
                    bail!("fraction must be in [0, 1), not {f}");
                }
                Outliers::Fraction { ppm: (f * 1e6).round() as u32 }
            });
            weight_bits = 8;
        } else if ext.fraction.is_some() || ext.use_sigma {
            bail!("fraction and use_sigma belong to sparse quantization (int4 weights, static int8 activations)");
        }
        if act_bits == 4 && (weight_bits != 4 || group_size.is_some() || !weight_symmetric) {
            bail!("W4A4_DYNAMIC takes int4 symmetric per-channel weights (vLLM-Ascend reads one scale per row)");
        }
        let spec = QuantSpec {
            weight_bits,
            group_size,
            weight_symmetric,
            weight_method,
            act_order: ext.act_order,
            true_sequential: ext.true_sequential,
            act,
            act_bits,
            act_method,
            lowbit,
        };
        Ok(spec)
    }
}

/// msModelSlim's `qconfig: {act: …, weight: …}`.
#[derive(Debug, Clone, Deserialize)]
pub struct QConfig {
    #[serde(default)]
    pub act: Option<TensorQConfig>,
    pub weight: TensorQConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorQConfig {
    pub scope: String,
    pub dtype: String,
    #[serde(default)]
    pub symmetric: Option<bool>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub group_size: Option<usize>,
    #[serde(default)]
    pub ext: Option<QExt>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct QExt {
    #[serde(default)]
    pub group_size: Option<usize>,
    #[serde(default)]
    pub act_order: bool,
    #[serde(default)]
    pub true_sequential: bool,
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub use_sigma: bool,
    #[serde(default)]
    pub sigma_factor: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_name_their_ascend_types() {
        for (p, t) in [
            ("w8a16", "W8A16"),
            ("w8a8_dynamic", "W8A8_DYNAMIC"),
            ("w8a8", "W8A8"),
            ("w4a8_dynamic", "W4A8_DYNAMIC"),
            ("w4a16", "W4A16"),
        ] {
            assert_eq!(QuantSpec::preset(p).unwrap().ascend_type(), t);
        }
        assert_eq!(QuantSpec::preset("w4a16").unwrap().group_len(4096), 128);
        assert_eq!(QuantSpec::preset("w8a16").unwrap().group_len(4096), 4096);
    }

    #[test]
    fn qconfig_from_msmodelslim_yaml() {
        let y = "act: {scope: per_tensor, dtype: int8, symmetric: false, method: minmax}\nweight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}";
        let q: QConfig = serde_yaml::from_str(y).unwrap();
        assert_eq!(QuantSpec::from_qconfig(&q).unwrap(), QuantSpec::preset("w8a8").unwrap());
        let y = "weight: {scope: per_group, dtype: int4, symmetric: true, method: minmax, ext: {group_size: 64}}";
        let q: QConfig = serde_yaml::from_str(y).unwrap();
        assert_eq!(QuantSpec::from_qconfig(&q).unwrap().group_size, Some(64));
        let y = "weight: {scope: per_channel, dtype: fp8}";
        let q: QConfig = serde_yaml::from_str(y).unwrap();
        assert!(QuantSpec::from_qconfig(&q).unwrap_err().to_string().contains("fp8"));
    }

    fn parse(y: &str) -> Result<QuantSpec> {
        QuantSpec::from_qconfig(&serde_yaml::from_str::<QConfig>(y).unwrap())
    }

    #[test]
    fn the_new_schemes_and_their_limits() {
        let awq = parse("weight: {scope: per_group, dtype: int4, symmetric: false, ext: {group_size: 128}}").unwrap();
        assert_eq!((awq.ascend_type(), awq.q_range(), awq.group_size), ("W4A16", (-8, 7), Some(128)));
        assert_eq!(QuantSpec::preset("w4a16").unwrap().q_range(), (-7, 7));
        let s = parse("act: {scope: per_tensor, dtype: int8}\nweight: {scope: per_channel, dtype: int4, method: lowbit, ext: {fraction: 0.012}}").unwrap();
        assert_eq!((s.ascend_type(), s.weight_bits, s.lowbit), ("W8A8S", 8, Some(Outliers::Fraction { ppm: 12_000 })));
        let s = parse(
            "act: {scope: per_tensor, dtype: int8}\nweight: {scope: per_channel, dtype: int4, ext: {use_sigma: true}}",
        )
        .unwrap();
        assert_eq!(s.lowbit, Some(Outliers::Sigma { milli: 3000 }));
        let s = parse("act: {scope: per_token, dtype: int4}\nweight: {scope: per_channel, dtype: int4}").unwrap();
        assert_eq!((s.ascend_type(), s.act_bits), ("W4A4_DYNAMIC", 4));
        let g = parse(
            "weight: {scope: per_group, dtype: int4, method: gptq, ext: {act_order: true, true_sequential: true}}",
        )
        .unwrap();
        assert!(g.act_order && g.true_sequential && g.weight_method == WeightMethod::Gptq);
        for (bad, why) in [
            ("weight: {scope: per_channel, dtype: int8, ext: {act_order: true}}", "GPTQ"),
            ("act: {scope: per_token, dtype: int8}\nweight: {scope: per_channel, dtype: int8, symmetric: false}", "weight-only"),
            ("act: {scope: per_tensor, dtype: int4}\nweight: {scope: per_channel, dtype: int4}", "per token"),
            ("act: {scope: per_token, dtype: int4}\nweight: {scope: per_channel, dtype: int8}", "W4A4"),
            ("weight: {scope: per_channel, dtype: int8, ext: {fraction: 0.02}}", "sparse"),
            ("act: {scope: per_tensor, dtype: int8}\nweight: {scope: per_channel, dtype: int4, ext: {fraction: 1.5}}", "fraction"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
