//! msModelSlim's "AscendV1" format, read by vLLM-Ascend and MindIE: `quant_model_weights*.safetensors`,
//! their index, and `quant_model_description.json` giving every tensor a quantization type.

use super::{Exporter, OutMeta, OutTensor, FLOAT};
use crate::quant::{ActQuant, QuantSpec, QuantizedLinear};
use crate::tensor::{DType, Tensor, TensorMeta};
use anyhow::Result;
use serde_json::{json, Map, Value};

pub const DESCRIPTION: &str = "quant_model_description.json";
pub const WEIGHTS: &str = "quant_model_weights";

/// From weakest to strongest: `model_quant_type` is the strongest type present. W4A8_DYNAMIC is
/// left out, as msModelSlim leaves it out.
const PRIORITY: [&str; 6] = ["FLOAT", "W8A16", "W8A8_DYNAMIC", "W8A8", "W4A16", "W4A4_DYNAMIC"];

pub struct AscendExporter {
    /// `deq_scale` is stored as f32 for bf16 models and as the f32 bit pattern in int64 otherwise.
    pub model_is_bf16: bool,
}

impl AscendExporter {
    fn deq_scale_dtype(&self) -> DType {
        if self.model_is_bf16 {
            DType::F32
        } else {
            DType::I64
        }
    }
}

impl Exporter for AscendExporter {
    fn linear_layout(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize, has_bias: bool) -> Vec<OutMeta> {
        let kind = spec.ascend_type();
        let groups = cols.div_ceil(spec.group_len(cols));
        let m = |suffix: &str, dtype, shape: &[usize], kind| OutMeta {
            meta: TensorMeta::new(format!("{module}.{suffix}"), dtype, shape),
            kind,
        };
        let mut out = match spec.act {
            ActQuant::PerTensorStatic { .. } => vec![
                m("weight", DType::I8, &[rows, cols], kind),
                m("quant_bias", DType::I32, &[rows], kind),
                m("input_scale", DType::F32, &[1], kind),
                m("input_offset", DType::F32, &[1], kind),
                m("deq_scale", self.deq_scale_dtype(), &[rows], kind),
            ],
            _ if spec.weight_bits == 4 && spec.act == ActQuant::PerToken => vec![
                m("weight", DType::I8, &[rows / 2, cols], kind),
                m("weight_scale", DType::F32, &[rows, 1], kind),
                m("weight_offset", DType::F32, &[rows, 1], kind),
                m("scale_bias", DType::F32, &[rows, 1], kind),
            ],
            _ => vec![
                m("weight", DType::I8, &[rows, cols], kind),
                m("weight_scale", DType::F32, &[rows, groups], kind),
                m("weight_offset", DType::F32, &[rows, groups], kind),
            ],
        };
        if has_bias {
            out.push(m("bias", DType::F32, &[rows], FLOAT));
        }
        out
    }

    fn linear_tensors(&self, module: &str, ql: &QuantizedLinear) -> Vec<OutTensor> {
        let spec = &ql.spec;
        let kind = spec.ascend_type();
        let w = &ql.weight;
        let (rows, cols, groups) = (w.rows, w.cols, w.groups());
        let t = |suffix: &str, tensor: Tensor, kind| OutTensor { name: format!("{module}.{suffix}"), tensor, kind };
        let mut out = Vec::new();
        match spec.act {
            ActQuant::PerTensorStatic { .. } => {
                let input = ql.input.expect("a static scheme carries its activation range");
                let deq: Vec<f32> = w.scale.iter().map(|s| input.scale * s).collect();
                let bias = ql.bias.clone().unwrap_or_else(|| vec![0.0; rows]);
                let quant_bias: Vec<i32> = (0..rows)
                    .map(|r| {
                        let qsum: f32 = w.q[r * cols..(r + 1) * cols].iter().map(|&x| x as f32).sum();
                        (bias[r] / deq[r] - qsum * input.offset).round_ties_even() as i32
                    })
                    .collect();
                let deq_t = if self.model_is_bf16 {
                    Tensor::from_f32(&[rows], &deq)
                } else {
                    Tensor::from_i64(&[rows], &deq.iter().map(|d| d.to_bits() as i64).collect::<Vec<_>>())
                };
                out.push(t("weight", Tensor::from_i8(&[rows, cols], &w.q), kind));
                out.push(t("quant_bias", Tensor::from_i32(&[rows], &quant_bias), kind));
                out.push(t("input_scale", Tensor::from_f32(&[1], &[input.scale]), kind));
                out.push(t("input_offset", Tensor::from_f32(&[1], &[input.offset]), kind));
                out.push(t("deq_scale", deq_t, kind));
            }
            _ if spec.weight_bits == 4 && spec.act == ActQuant::PerToken => {
                out.push(t("weight", pack_int4_row_pairs(&w.q, rows, cols), kind));
                out.push(t("weight_scale", Tensor::from_f32(&[rows, 1], &w.scale), kind));
                out.push(t("weight_offset", Tensor::from_f32(&[rows, 1], &vec![0.0; rows]), kind));
                // 8 × the row sum of the dequantized weight, which the NPU kernel needs for its unsigned int4 trick.
                let scale_bias: Vec<f32> = (0..rows)
                    .map(|r| 8.0 * w.q[r * cols..(r + 1) * cols].iter().map(|&x| x as f32 * w.scale[r]).sum::<f32>())
                    .collect();
                out.push(t("scale_bias", Tensor::from_f32(&[rows, 1], &scale_bias), kind));
            }
            _ => {
                out.push(t("weight", Tensor::from_i8(&[rows, cols], &w.q), kind));
                out.push(t("weight_scale", Tensor::from_f32(&[rows, groups], &w.scale), kind));
                out.push(t("weight_offset", Tensor::from_f32(&[rows, groups], &vec![0.0; rows * groups]), kind));
            }
        }
        if let (Some(b), true) = (&ql.bias, ql.write_bias) {
            out.push(t("bias", Tensor::from_f32(&[rows], b), FLOAT));
        }
        out
    }

    fn weights_file(&self, k: usize, n: usize) -> String {
        if n == 1 {
            format!("{WEIGHTS}.safetensors")
        } else {
            format!("{WEIGHTS}-{:05}-of-{:05}.safetensors", k + 1, n)
        }
    }

    fn index_file(&self) -> &'static str {
        "quant_model_weights.safetensors.index.json"
    }

    fn metadata_files(&self, outputs: &[OutMeta]) -> Result<Vec<(String, Vec<u8>)>> {
        let mut desc = Map::new();
        let mut strongest = 0;
        for o in outputs {
            desc.insert(o.meta.name.clone(), Value::String(o.kind.to_string()));
            if let Some(p) = PRIORITY.iter().position(|k| *k == o.kind) {
                strongest = strongest.max(p);
            }
        }
        let group_size = w4a16_group_size(outputs);
        desc.insert("model_quant_type".into(), json!(PRIORITY[strongest]));
        desc.insert("version".into(), json!("1.0.0"));
        desc.insert("group_size".into(), json!(group_size));
        desc.insert("metadata".into(), json!({}));
        desc.insert("optional".into(), json!({}));
        let mut bytes = serde_json::to_vec_pretty(&Value::Object(desc))?;
        bytes.push(b'\n');
        Ok(vec![(DESCRIPTION.to_string(), bytes)])
    }

    fn output_config(&self, config: &Value) -> Value {
        let mut c = config.clone();
        if let Some(o) = c.as_object_mut() {
            o.remove("quantization_config");
            if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                t.remove("quantization_config");
            }
        }
        c
    }
}

/// The group length of W4A16 weights: input columns over scale columns.
fn w4a16_group_size(outputs: &[OutMeta]) -> usize {
    for o in outputs.iter().filter(|o| o.kind == "W4A16" && o.meta.name.ends_with(".weight")) {
        let scale_name = o.meta.name.replace(".weight", ".weight_scale");
        if let Some(s) = outputs.iter().find(|x| x.meta.name == scale_name) {
            return o.meta.shape[1] / s.meta.shape[1].max(1);
        }
    }
    0
}

/// msModelSlim's W4A8 packing: two int4 values of adjacent output rows share a byte, the even
/// row in the low nibble: `packed[r, c] = q[2r, c] & 0xF | q[2r+1, c] << 4`, shape `[rows/2, cols]`.
pub fn pack_int4_row_pairs(q: &[i8], rows: usize, cols: usize) -> Tensor {
    let mut out = vec![0i8; rows / 2 * cols];
    for r in 0..rows / 2 {
        for c in 0..cols {
            let lo = q[2 * r * cols + c] as u8 & 0x0F;
            let hi = (q[(2 * r + 1) * cols + c] as u8) << 4;
            out[r * cols + c] = (lo | hi) as i8;
        }
    }
    Tensor::from_i8(&[rows / 2, cols], &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn, QuantSpec};

    fn linear(spec: &str, rows: usize, cols: usize, bias: bool) -> QuantizedLinear {
        let spec = QuantSpec::preset(spec).unwrap();
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        QuantizedLinear {
            spec,
            weight: rtn::quantize(&w, rows, cols, &spec),
            bias: bias.then(|| (0..rows).map(|r| r as f32 * 0.1).collect()),
            write_bias: bias,
            input: Some(crate::quant::ActRange { scale: 0.05, offset: -3.0 }),
        }
    }

    #[test]
    fn layout_and_tensors_agree_for_every_scheme() {
        for bf16 in [true, false] {
            let ex = AscendExporter { model_is_bf16: bf16 };
            for scheme in ["w8a16", "w8a8_dynamic", "w8a8", "w4a8_dynamic", "w4a16"] {
                for bias in [false, true] {
                    let ql = linear(scheme, 8, 256, bias);
                    let planned = ex.linear_layout("m", &ql.spec, 8, 256, bias);
                    let made: Vec<_> = ex.linear_tensors("m", &ql).iter().map(|t| t.out_meta()).collect();
                    assert_eq!(planned, made, "{scheme} bias={bias} bf16={bf16}");
                }
            }
        }
    }

    #[test]
    fn static_w8a8_derived_tensors_follow_the_formulas() {
        let ex = AscendExporter { model_is_bf16: false };
        let ql = linear("w8a8", 4, 16, true);
        let ts = ex.linear_tensors("m", &ql);
        let get = |n: &str| ts.iter().find(|t| t.name == format!("m.{n}")).unwrap();
        let deq: Vec<f32> =
            get("deq_scale").tensor.to_i64().unwrap().iter().map(|&b| f32::from_bits(b as u32)).collect();
        let qb: Vec<i64> = get("quant_bias").tensor.to_i64().unwrap();
        for r in 0..4 {
            assert_eq!(deq[r], 0.05 * ql.weight.scale[r]);
            let qsum: f32 = ql.weight.q[r * 16..(r + 1) * 16].iter().map(|&x| x as f32).sum();
            let want = (ql.bias.as_ref().unwrap()[r] / deq[r] - qsum * -3.0).round();
            assert!((qb[r] as f32 - want).abs() <= 1.0);
        }
    }

    #[test]
    fn int4_packing_round_trips() {
        let q: Vec<i8> = vec![-8, 7, 3, -1, 0, 5, -2, 1];
        let p = pack_int4_row_pairs(&q, 4, 2);
        let b: Vec<i8> = p.bytes.iter().map(|&x| x as i8).collect();
        for r in 0..2 {
            for c in 0..2 {
                let lo = ((b[r * 2 + c] << 4) >> 4) as i8;
                let hi = b[r * 2 + c] >> 4;
                assert_eq!((lo, hi), (q[2 * r * 2 + c], q[(2 * r + 1) * 2 + c]));
            }
        }
    }
}
