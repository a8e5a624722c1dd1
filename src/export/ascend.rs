//! msModelSlim's "AscendV1" format, read by vLLM-Ascend and MindIE: `quant_model_weights*.safetensors`,
//! their index, and `quant_model_description.json` giving every tensor a quantization type.
//!
//! Per linear `X` (`out × in`), by scheme:
//! - `W8A16`, `W8A8_DYNAMIC`: `X.weight` int8 `[out, in]`, `X.weight_scale` and `X.weight_offset` (zeros) f32
//!   `[out, 1]`, or `[out, in/g]` per group (msModelSlim's `on_w8a16_*` / `on_w8a8_dynamic_*`; vLLM-Ascend's
//!   `w8a16.py` / `w8a8_dynamic.py` read the per-channel form).
//! - `W8A8` (static): `X.weight`, `X.quant_bias` int32, `X.input_scale`, `X.input_offset` f32 `[1]`,
//!   `X.deq_scale` (`on_w8a8_static`): f32 when the model is served in bfloat16, the f32 bits in int64 when
//!   served in float16, as vLLM-Ascend's `w8a8_static.py` creates the parameter for the serving dtype
//!   (`--serving_dtype`, default the checkpoint's `torch_dtype`; msModelSlim decides by the source dtype,
//!   which breaks a bf16 model served in fp16, and every model on 310P).
//! - `W4A8_DYNAMIC`: see [`w4a8`]. `W4A16`: see [`w4a16`].
//! - `W8A8S` (msModelSlim's sparse quantization): the tensors of static `W8A8`, typed `W8A8S`; the
//!   int8 weights sit mostly within ±7 (a 4-bit scale) with the outliers beyond. msModelSlim writes
//!   them so (`complex_quantifier.py`, W8A8S yields the W8A8 tensors); vLLM-Ascend reads them on
//!   310P (`_310p/quantization/methods/w8a8s.py`, the W8A8 parameters). The compressed form W8A8SC
//!   is not written: see the README.
//! - `W4A4_DYNAMIC`: `X.weight` int8 `[out, in]` holding int4 values, `X.weight_scale` and
//!   `X.weight_offset` (zeros) f32 `[out, 1]` (msModelSlim v1's `on_w4a4_dynamic_per_channel`);
//!   vLLM-Ascend's `AscendW4A4LaosDynamicLinearMethod` packs the int8 values to int4 itself
//!   (`npu_convert_weight_to_int4pack`) and quantizes activations per token to int4.
//! - A bias is written as `X.bias` f32, type `FLOAT`.
//!
//! - The int8 KV cache (C8) of an attention module `A`: `A.k_proj.kv_cache_scale`, `A.k_proj.kv_cache_offset`,
//!   `A.v_proj.kv_cache_scale`, `A.v_proj.kv_cache_offset`, f32 `[kv_heads · head_dim]`, type `C8`
//!   (msModelSlim's `on_dynamic_cache`; see [`crate::quant::kv_cache`] for what they quantize).
//!
//! Global keys: `model_quant_type` (see [`PRIORITY`]), `version` "1.0.0", `group_size` (the group length of
//! per-group linears, 0 when every linear is per channel, as msModelSlim sets it), `metadata` (lamina records
//! the serving dtype, the `deq_scale` dtype, the target), `optional`; with C8, `kv_cache_type` and
//! `kv_quant_type` "C8".
//!
//! The names, dtypes and shapes of every type come from one table, [`rules::TYPES`], which `lamina check`
//! also checks outputs against; this module fills the tensors with data.

pub mod w4a16;
pub mod w4a8;

use super::rules::{self, Target};
use super::{Exporter, OutMeta, OutTensor, FLOAT};
use crate::quant::kv_cache::KvCacheQuant;
use crate::quant::{ActQuant, QuantSpec, QuantizedLinear};
use crate::tensor::{DType, Tensor};
use anyhow::Result;
use ndarray::ArrayView2;
use serde_json::{json, Map, Value};

pub const DESCRIPTION: &str = "quant_model_description.json";
/// Where msModelSlim exports QuaRot's global rotation, relative to the save folder.
pub const QUAROT_FILE: &str = "optional/quarot.safetensors";
pub const WEIGHTS: &str = "quant_model_weights";

pub use rules::PRIORITY;

pub struct AscendExporter {
    /// The dtype the server computes in: it decides `deq_scale`'s dtype (f32 for bfloat16, the f32 bit
    /// pattern in int64 for float16; see [`rules::deq_scale_dtype`]).
    pub serving: DType,
    /// The server the output is for (recorded in the description's metadata).
    pub target: Target,
}

/// How a scheme's tensors are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// W8A8 with a calibrated per-tensor activation range.
    Static,
    /// W8A16, W8A8_DYNAMIC and W4A4_DYNAMIC: int8 weights (int4 values for W4A4) and scales,
    /// nothing else.
    Int8,
    W4A8,
    W4A16,
}

impl Scheme {
    fn of(spec: &QuantSpec) -> Scheme {
        match (spec.weight_bits, spec.act) {
            (_, ActQuant::PerTensorStatic { .. }) => Scheme::Static,
            (4, ActQuant::PerToken) if spec.act_bits == 4 => Scheme::Int8,
            (4, ActQuant::PerToken) => Scheme::W4A8,
            (4, _) => Scheme::W4A16,
            _ => Scheme::Int8,
        }
    }
}

impl AscendExporter {
    fn deq_scale_dtype(&self) -> DType {
        rules::deq_scale_dtype(self.serving).unwrap_or(DType::F32)
    }

    /// The description's global keys for these outputs: `model_quant_type` (msModelSlim's priority),
    /// `version`, `group_size`, `metadata` (what lamina decided: the serving dtype and the `deq_scale` dtype
    /// it implies, the target), `optional`.
    pub fn globals(&self, outputs: &[OutMeta], specs: &[QuantSpec]) -> Map<String, Value> {
        let strongest = outputs.iter().filter_map(|o| PRIORITY.iter().position(|k| *k == o.kind)).max().unwrap_or(0);
        let mut g = Map::new();
        g.insert("model_quant_type".into(), json!(PRIORITY[strongest]));
        g.insert("version".into(), json!("1.0.0"));
        g.insert("group_size".into(), json!(group_size(specs)));
        g.insert(
            "metadata".into(),
            json!({
                "producer": format!("lamina {}", env!("CARGO_PKG_VERSION")),
                "target": self.target.name(),
                "serving_dtype": self.serving.torch_name(),
                "deq_scale_dtype": self.deq_scale_dtype().name(),
            }),
        );
        g.insert("optional".into(), json!({}));
        // msModelSlim's on_dynamic_cache sets both; vLLM-Ascend reads kv_cache_type.
        if outputs.iter().any(|o| o.kind == rules::C8) {
            g.insert("kv_cache_type".into(), json!(rules::C8));
            g.insert("kv_quant_type".into(), json!(rules::C8));
        }
        g
    }
}

impl Exporter for AscendExporter {
    fn check_linear(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize) -> Result<()> {
        match Scheme::of(spec) {
            Scheme::W4A8 => w4a8::check(module, spec.group_size, rows, cols),
            Scheme::W4A16 => w4a16::check(module, cols),
            Scheme::Static | Scheme::Int8 => Ok(()),
        }
    }

    fn linear_layout(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize, has_bias: bool) -> Vec<OutMeta> {
        let groups = cols.div_ceil(spec.group_len(cols));
        // Asymmetric 4-bit weights carry their zero points in W4A16's optional `weight_offset`.
        let mut optional = Vec::new();
        if Scheme::of(spec) == Scheme::W4A16 && !spec.weight_symmetric {
            optional.push("weight_offset");
        }
        if has_bias {
            optional.push("bias");
        }
        rules::linear_layout(spec.ascend_type(), module, rows, cols, groups, self.serving, &optional)
    }

    fn linear_tensors(&self, module: &str, ql: &QuantizedLinear) -> Vec<OutTensor> {
        let spec = &ql.spec;
        let kind = spec.ascend_type();
        let w = &ql.weight;
        let (rows, cols, groups) = (w.rows, w.cols, w.groups());
        let t = |suffix: &str, tensor: Tensor, kind| OutTensor { name: format!("{module}.{suffix}"), tensor, kind };
        let mut out = match Scheme::of(spec) {
            Scheme::Static => {
                let input = ql.input.expect("a static scheme carries its activation range");
                let deq: Vec<f32> = w.scale.iter().map(|s| input.scale * s).collect();
                let bias = ql.bias.clone().unwrap_or_else(|| vec![0.0; rows]);
                let quant_bias: Vec<i32> = (0..rows)
                    .map(|r| {
                        let qsum: f32 = w.q[r * cols..(r + 1) * cols].iter().map(|&x| x as f32).sum();
                        (bias[r] / deq[r] - qsum * input.offset).round_ties_even() as i32
                    })
                    .collect();
                // msModelSlim's deqscale2int64: the f32 bits read as int32, widened to int64.
                let deq_rule = rules::rule(kind).and_then(|r| r.tensors.iter().find(|t| t.suffix == "deq_scale"));
                let deq_dtype =
                    deq_rule.map_or(self.deq_scale_dtype(), |t| rules::written_dtype(t.dtype, self.serving));
                let deq_t = match deq_dtype {
                    DType::I64 => {
                        Tensor::from_i64(&[rows], &deq.iter().map(|d| d.to_bits() as i32 as i64).collect::<Vec<_>>())
                    }
                    _ => Tensor::from_f32(&[rows], &deq),
                };
                vec![
                    t("weight", Tensor::from_i8(&[rows, cols], &w.q), kind),
                    t("quant_bias", Tensor::from_i32(&[rows], &quant_bias), kind),
                    t("input_scale", Tensor::from_f32(&[1], &[input.scale]), kind),
                    t("input_offset", Tensor::from_f32(&[1], &[input.offset]), kind),
                    t("deq_scale", deq_t, kind),
                ]
            }
            Scheme::Int8 => vec![
                t("weight", Tensor::from_i8(&[rows, cols], &w.q), kind),
                t("weight_scale", Tensor::from_f32(&[rows, groups], &w.scale), kind),
                t(
                    "weight_offset",
                    Tensor::from_f32(&[rows, groups], w.offset.as_deref().unwrap_or(&vec![0.0; rows * groups])),
                    kind,
                ),
            ],
            Scheme::W4A8 => w4a8::tensors(module, w),
            Scheme::W4A16 => w4a16::tensors(module, w),
        };
        if let (Some(b), true) = (&ql.bias, ql.write_bias) {
            out.push(t("bias", Tensor::from_f32(&[rows], b), FLOAT));
        }
        out
    }

    fn kv_cache_layout(&self, module: &str, k_channels: usize, v_channels: usize) -> Vec<OutMeta> {
        rules::kv_cache_layout(module, k_channels, v_channels)
    }

    fn kv_cache_tensors(&self, module: &str, q: &KvCacheQuant) -> Vec<OutTensor> {
        rules::C8_TENSORS
            .iter()
            .map(|(sfx, side)| {
                let c = if *side == rules::KvSide::K { &q.k } else { &q.v };
                let v = if sfx.ends_with("scale") { &c.scale } else { &c.offset };
                OutTensor { name: format!("{module}.{sfx}"), tensor: Tensor::from_f32(&[v.len()], v), kind: rules::C8 }
            })
            .collect()
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

    fn is_output_file(&self, name: &str) -> bool {
        name == DESCRIPTION
            || name == QUAROT_FILE
            || name == self.index_file()
            || (name.starts_with(WEIGHTS) && name.ends_with(".safetensors"))
    }

    fn metadata_files(
        &self,
        config: &Value,
        outputs: &[OutMeta],
        linears: &[(String, QuantSpec)],
        _float_linears: &[String],
        rotation: Option<ArrayView2<f32>>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let specs: Vec<QuantSpec> = linears.iter().map(|(_, s)| *s).collect();
        let mut desc = Map::new();
        for o in outputs {
            desc.insert(o.meta.name.clone(), Value::String(o.kind.to_string()));
        }
        // The names vLLM-Ascend looks some linears up under (GLM-4.1V's vision qkv_proj, gate_up_proj).
        let model_type = config.get("model_type").and_then(Value::as_str).unwrap_or("");
        let aliases = rules::lookup_alias_entries(model_type, outputs.iter().map(|o| (o.meta.name.as_str(), o.kind)))?;
        for (key, kind) in aliases {
            desc.entry(key).or_insert(Value::String(kind));
        }
        desc.extend(self.globals(outputs, &specs));
        let mut files =
            vec![("config.json".to_string(), super::json_bytes(&super::config_without_quantization(config))?)];
        // msModelSlim's QuaRot export (`export_extra_info`), read by vLLM-Ascend's EAGLE-3 drafter
        // (`optional.quarot.rotation_map.global_rotation`, a safetensors file with `global_rotation`).
        if let Some(q) = rotation {
            desc.insert("optional".into(), json!({"quarot": {"rotation_map": {"global_rotation": QUAROT_FILE}}}));
            let q = q.as_standard_layout();
            let t = Tensor::from_f32(&[q.nrows(), q.ncols()], q.as_slice().expect("standard layout"));
            files.push((
                QUAROT_FILE.to_string(),
                crate::io::safetensors::serialize(&[("global_rotation".to_string(), t)])?,
            ));
        }
        // The description last: it marks the output complete.
        files.push((DESCRIPTION.to_string(), super::json_bytes(&Value::Object(desc))?));
        Ok(files)
    }

    fn format_name(&self) -> &'static str {
        "ascend_v1"
    }
}

/// The description's global `group_size`: the group length of the per-group linears, 0 when every linear
/// is per channel (as msModelSlim sets it). The key holds one value: the rules ([`rules::check`]) refuse a
/// plan whose per-group linears disagree, so the last one in plan order is as good as any.
pub fn group_size(specs: &[QuantSpec]) -> usize {
    specs.iter().rev().find_map(|s| s.group_size).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn, QuantSpec};
    use crate::tensor::TensorMeta;

    /// Asymmetric W4A16, W8A8S, W4A4_DYNAMIC.
    const NEW_SCHEMES: [&str; 3] = [
        "weight: {scope: per_group, dtype: int4, symmetric: false, ext: {group_size: 128}}",
        "act: {scope: per_tensor, dtype: int8}\nweight: {scope: per_channel, dtype: int4, method: lowbit}",
        "act: {scope: per_token, dtype: int4}\nweight: {scope: per_channel, dtype: int4}",
    ];

    fn spec_of(y: &str) -> QuantSpec {
        QuantSpec::from_qconfig(&serde_yaml::from_str(y).unwrap()).unwrap()
    }

    fn linear(spec: &str, rows: usize, cols: usize, bias: bool) -> QuantizedLinear {
        linear_of(QuantSpec::preset(spec).unwrap(), rows, cols, bias)
    }

    fn linear_of(spec: QuantSpec, rows: usize, cols: usize, bias: bool) -> QuantizedLinear {
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
            let ex =
                AscendExporter { serving: if bf16 { DType::BF16 } else { DType::F16 }, target: Target::VllmAscend };
            let specs: Vec<QuantSpec> = ["w8a16", "w8a8_dynamic", "w8a8", "w4a8_dynamic", "w4a16"]
                .iter()
                .map(|p| QuantSpec::preset(p).unwrap())
                .chain(NEW_SCHEMES.iter().map(|y| spec_of(y)))
                .collect();
            for spec in specs {
                let scheme = spec.ascend_type();
                for (bias, module) in [(false, "l.q_proj"), (true, "l.q_proj"), (false, "l.down_proj")] {
                    let ql = linear_of(spec, 8, 256, bias);
                    ex.check_linear(module, &ql.spec, 8, 256).unwrap();
                    let planned = ex.linear_layout(module, &ql.spec, 8, 256, bias);
                    let made: Vec<_> = ex.linear_tensors(module, &ql).iter().map(|t| t.out_meta()).collect();
                    assert_eq!(planned, made, "{scheme} {module} bias={bias} bf16={bf16}");
                }
            }
        }
    }

    #[test]
    fn static_w8a8_derived_tensors_follow_the_formulas() {
        let ex = AscendExporter { serving: DType::F16, target: Target::VllmAscend };
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
    fn description_global_keys_follow_msmodelslim() {
        let ex = AscendExporter { serving: DType::BF16, target: Target::VllmAscend };
        let describe = |schemes: &[&str]| -> Value {
            let mut outputs = vec![OutMeta { meta: TensorMeta::new("norm.weight", DType::BF16, &[8]), kind: FLOAT }];
            let mut specs = Vec::new();
            for (i, s) in schemes.iter().enumerate() {
                let spec = QuantSpec::preset(s).unwrap();
                outputs.extend(ex.linear_layout(&format!("l{i}.down_proj"), &spec, 8, 256, false));
                specs.push(spec);
            }
            let linears: Vec<(String, QuantSpec)> =
                specs.iter().enumerate().map(|(i, s)| (format!("l{i}.down_proj"), *s)).collect();
            let files = ex.metadata_files(&json!({}), &outputs, &linears, &[], None).unwrap();
            serde_json::from_slice(&files.last().unwrap().1).unwrap()
        };
        let d = describe(&["w4a8_dynamic", "w8a8_dynamic"]);
        assert_eq!((d["model_quant_type"].as_str(), d["group_size"].as_u64()), (Some("W8A8_DYNAMIC"), Some(0)));
        assert_eq!(d["l0.down_proj.scale_bias"], "W4A8_DYNAMIC");
        // W4A8 alone is hidden: the model reads as FLOAT, as msModelSlim writes it.
        assert_eq!(describe(&["w4a8_dynamic"])["model_quant_type"], "FLOAT");
        let d = describe(&["w8a16", "w4a16"]);
        assert_eq!((d["model_quant_type"].as_str(), d["group_size"].as_u64()), (Some("W4A16"), Some(128)));
        assert_eq!(d["l1.down_proj.weight_packed"], "W4A16");
        assert_eq!(describe(&["w8a8", "w8a8_dynamic", "w8a16"])["model_quant_type"], "W8A8");
        assert_eq!(d["version"], "1.0.0");
    }
}
