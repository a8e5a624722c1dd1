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

/// One linear's quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub weight_bits: u8,
    /// `None` for per output channel.
    pub group_size: Option<usize>,
    pub weight_symmetric: bool,
    pub weight_method: WeightMethod,
    pub act: ActQuant,
    pub act_method: ActMethod,
}

impl QuantSpec {
    /// The Ascend description type of this scheme.
    pub fn ascend_type(&self) -> &'static str {
        match (self.weight_bits, self.act) {
            (8, ActQuant::None) => "W8A16",
            (8, ActQuant::PerToken) => "W8A8_DYNAMIC",
            (8, ActQuant::PerTensorStatic { .. }) => "W8A8",
            (4, ActQuant::PerToken) => "W4A8_DYNAMIC",
            (4, ActQuant::None) => "W4A16",
            _ => unreachable!("validated when the spec was built"),
        }
    }

    /// The largest quantized magnitude (127 for int8, 7 for int4).
    pub fn qmax(&self) -> i32 {
        (1 << (self.weight_bits - 1)) - 1
    }

    pub fn needs_calibration(&self) -> bool {
        matches!(self.act, ActQuant::PerTensorStatic { .. }) || self.weight_method == WeightMethod::Gptq
    }

    /// The group length along the input dimension for a linear with `cols` inputs.
    pub fn group_len(&self, cols: usize) -> usize {
        self.group_size.unwrap_or(cols).min(cols).max(1)
    }

    /// The named `--quant_type` presets.
    pub fn preset(name: &str) -> Option<QuantSpec> {
        let base = QuantSpec {
            weight_bits: 8,
            group_size: None,
            weight_symmetric: true,
            weight_method: WeightMethod::MinMax,
            act: ActQuant::None,
            act_method: ActMethod::MinMax,
        };
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
    pub fn from_qconfig(q: &QConfig) -> Result<QuantSpec> {
        let w = &q.weight;
        let weight_bits = match w.dtype.as_str() {
            "int8" => 8,
            "int4" => 4,
            other => bail!("weight dtype {other:?} is not supported (int8, int4)"),
        };
        let group_size = match w.scope.as_str() {
            "per_channel" => w.ext.as_ref().and_then(|e| e.group_size).filter(|_| weight_bits == 4 && q.act.is_none()),
            "per_group" => Some(w.ext.as_ref().and_then(|e| e.group_size).or(w.group_size).unwrap_or(128)),
            other => bail!("weight scope {other:?} is not supported (per_channel, per_group)"),
        };
        let weight_method = match w.method.as_deref().unwrap_or("minmax") {
            "minmax" | "ssz" => WeightMethod::MinMax,
            "gptq" => WeightMethod::Gptq,
            other => bail!("weight method {other:?} is not supported (minmax, gptq)"),
        };
        let (act, act_method) = match &q.act {
            None => (ActQuant::None, ActMethod::MinMax),
            Some(a) => {
                if a.dtype != "int8" {
                    bail!("activation dtype {:?} is not supported (int8)", a.dtype);
                }
                let act = match a.scope.as_str() {
                    "per_token" => ActQuant::PerToken,
                    "per_tensor" => ActQuant::PerTensorStatic { symmetric: a.symmetric.unwrap_or(false) },
                    other => {
                        bail!("activation scope {other:?} is not supported (per_token, per_tensor)")
                    }
                };
                let method = match a.method.as_deref().unwrap_or("minmax") {
                    "minmax" => ActMethod::MinMax,
                    "histogram" => ActMethod::Histogram,
                    other => {
                        bail!("activation method {other:?} is not supported (minmax, histogram)")
                    }
                };
                (act, method)
            }
        };
        if !w.symmetric.unwrap_or(true) {
            bail!("asymmetric weights are not supported yet (set weight.symmetric: true)");
        }
        let spec = QuantSpec { weight_bits, group_size, weight_symmetric: true, weight_method, act, act_method };
        match (weight_bits, act) {
            (8, _) | (4, ActQuant::PerToken) | (4, ActQuant::None) => Ok(spec),
            _ => {
                bail!("int4 weights with static per-tensor activations are not a supported scheme")
            }
        }
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

#[derive(Debug, Clone, Deserialize)]
pub struct QExt {
    #[serde(default)]
    pub group_size: Option<usize>,
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
}
