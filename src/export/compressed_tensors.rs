//! compressed-tensors, the format vLLM and transformers load on GPUs (`--save_format compressed-tensors`):
//! `model*.safetensors` with the index transformers reads, and config.json carrying a `quantization_config`.
//! The layout is vllm-project/compressed-tensors' (`compressors/naive_quantized`, `compressors/pack_quantized`,
//! `quantization/quant_config.py`):
//!
//! | scheme | format | tensors of a linear `X` |
//! |---|---|---|
//! | W8A8 dynamic (int8 per token) | `int-quantized` | `X.weight` I8 `[out, in]`, `X.weight_scale` F32 `[out, 1]` |
//! | W8A8 static (int8 per tensor) | `int-quantized` | the same, `X.input_scale` F32 `[1]`, and `X.input_zero_point` I8 `[1]` when the activations are asymmetric |
//! | W8A16, W4A16 | `pack-quantized` | `X.weight_packed` I32 `[out, ceil(in·bits/32)]`, `X.weight_scale` F32 `[out, in/g]` (or `[out, 1]` per channel), `X.weight_shape` I64 `[2]` |
//!
//! Weights are symmetric (no weight zero point). Packing (`pack_to_int32`): each value offset by
//! `2^(bits-1)` to unsigned, element `i` of a row at bit `i·bits` of the row's words, low bits first. A
//! linear's own bias stays `X.bias`. Scales are written in f32 (vLLM's int8 kernels read f32 scales; a
//! model loaded in bfloat16 by transformers rounds them to its dtype).
//!
//! `quantization_config` (`quant_method` "compressed-tensors", `quantization_status` "compressed"): one config
//! group per scheme, each with its own `format` (the top-level `format` is that format, or
//! "mixed-precision"), targeting its linears by `re:` patterns that match the module names of every
//! spelling of the checkpoint's layout (release, transformers 5, vLLM: `(?:.*\.)?(?:model|language_model)\.layers\.\d+\.mlp\.down_proj$`);
//! the float linears are listed in `ignore`.
//!
//! What compressed-tensors cannot hold is refused when the run is planned ([`plan_problems`]): W4A8, per-group
//! int8 activations-and-weights, routed MoE experts (lamina writes them split; transformers and vLLM load
//! fused expert tensors), and biases that only smoothing's shift creates (compressed-tensors keeps the
//! model's modules, which have none): use SmoothQuant rather than m2's shift.

use super::{json_bytes, Exporter, OutMeta, OutTensor, FLOAT};
use crate::export::rules::LayerKind;
use crate::quant::kv_cache::KvCacheQuant;
use crate::quant::{ActQuant, QuantSpec, QuantizedLinear};
use crate::tensor::{DType, Tensor, TensorMeta};
use anyhow::{bail, Result};
use ndarray::ArrayView2;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const WEIGHTS: &str = "model";
pub const INDEX: &str = "model.safetensors.index.json";

/// How compressed-tensors stores a scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ct {
    /// `int-quantized`: int8 weights, int8 activations per token (`None`) or per tensor (`Some(symmetric)`).
    Int { static_symmetric: Option<bool> },
    /// `pack-quantized`: weight-only, `bits` packed into int32, groups of `group` (`None`: per channel).
    Pack { bits: u8, group: Option<usize> },
}

impl Ct {
    fn of(spec: &QuantSpec) -> Result<Ct> {
        Ok(match (spec.weight_bits, spec.act) {
            (8, ActQuant::PerToken) if spec.group_size.is_none() => Ct::Int { static_symmetric: None },
            (8, ActQuant::PerTensorStatic { symmetric }) if spec.group_size.is_none() => {
                Ct::Int { static_symmetric: Some(symmetric) }
            }
            (bits @ (4 | 8), ActQuant::None) => Ct::Pack { bits, group: spec.group_size },
            (4, ActQuant::PerToken) => bail!(
                "W4A8_DYNAMIC has no compressed-tensors scheme lamina writes (vLLM reads int4 weights with int8 activations only on some CPUs); use w4a16 or w8a8_dynamic, or the Ascend format"
            ),
            _ => bail!(
                "{} with weights in groups has no compressed-tensors scheme vLLM's int8 kernels read; use per-channel weights",
                spec.ascend_type()
            ),
        })
    }

    fn format(self) -> &'static str {
        match self {
            Ct::Int { .. } => "int-quantized",
            Ct::Pack { .. } => "pack-quantized",
        }
    }
}

/// Words of `cols` values of `bits` bits packed into int32.
fn packed_cols(cols: usize, bits: u8) -> usize {
    (cols * bits as usize).div_ceil(32)
}

pub struct CtExporter {
    /// The roots of the checkpoint's names with every spelling of them
    /// ([`crate::model::layout::Layout::roots`]), for the config groups' patterns.
    pub roots: Vec<(String, Vec<String>)>,
}

impl Exporter for CtExporter {
    fn check_linear(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize) -> Result<()> {
        let ct = Ct::of(spec).map_err(|e| anyhow::anyhow!("{module}: {e}"))?;
        let _ = rows;
        if let Ct::Pack { bits, group } = ct {
            if cols % (32 / bits as usize) != 0 {
                bail!("{module}: pack-quantized {bits}-bit weights fill whole int32 words, but the linear has {cols} inputs");
            }
            if let Some(g) = group {
                if cols % g != 0 {
                    bail!("{module}: groups of {g} must divide the {cols} inputs (compressed-tensors' group strategy and vLLM's kernels need it)");
                }
            }
        }
        Ok(())
    }

    fn linear_layout(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize, has_bias: bool) -> Vec<OutMeta> {
        let kind = spec.ascend_type();
        let m = |suffix: &str, dtype, shape: &[usize], kind| OutMeta {
            meta: TensorMeta::new(format!("{module}.{suffix}"), dtype, shape),
            kind,
        };
        let mut v = match Ct::of(spec).expect("checked when planned") {
            Ct::Int { static_symmetric } => {
                let mut v =
                    vec![m("weight", DType::I8, &[rows, cols], kind), m("weight_scale", DType::F32, &[rows, 1], kind)];
                if let Some(sym) = static_symmetric {
                    v.push(m("input_scale", DType::F32, &[1], kind));
                    if !sym {
                        v.push(m("input_zero_point", DType::I8, &[1], kind));
                    }
                }
                v
            }
            Ct::Pack { bits, .. } => {
                let groups = cols.div_ceil(spec.group_len(cols));
                vec![
                    m("weight_packed", DType::I32, &[rows, packed_cols(cols, bits)], kind),
                    m("weight_scale", DType::F32, &[rows, groups], kind),
                    m("weight_shape", DType::I64, &[2], kind),
                ]
            }
        };
        if has_bias {
            v.push(m("bias", DType::F32, &[rows], FLOAT));
        }
        v
    }

    fn linear_tensors(&self, module: &str, ql: &QuantizedLinear) -> Vec<OutTensor> {
        let kind = ql.spec.ascend_type();
        let w = &ql.weight;
        let (rows, cols) = (w.rows, w.cols);
        let t = |suffix: &str, tensor: Tensor, kind| OutTensor { name: format!("{module}.{suffix}"), tensor, kind };
        let mut v = match Ct::of(&ql.spec).expect("checked when planned") {
            Ct::Int { static_symmetric } => {
                let mut v = vec![
                    t("weight", Tensor::from_i8(&[rows, cols], &w.q), kind),
                    t("weight_scale", Tensor::from_f32(&[rows, 1], &w.scale), kind),
                ];
                if let Some(sym) = static_symmetric {
                    let input = ql.input.expect("a static scheme carries its activation range");
                    v.push(t("input_scale", Tensor::from_f32(&[1], &[input.scale]), kind));
                    if !sym {
                        v.push(t("input_zero_point", Tensor::from_i8(&[1], &[input.offset as i8]), kind));
                    }
                }
                v
            }
            Ct::Pack { bits, .. } => vec![
                t(
                    "weight_packed",
                    Tensor::from_bytes(DType::I32, &[rows, packed_cols(cols, bits)], pack(&w.q, rows, cols, bits)),
                    kind,
                ),
                t("weight_scale", Tensor::from_f32(&[rows, w.groups()], &w.scale), kind),
                t("weight_shape", Tensor::from_i64(&[2], &[rows as i64, cols as i64]), kind),
            ],
        };
        if let (Some(b), true) = (&ql.bias, ql.write_bias) {
            v.push(t("bias", Tensor::from_f32(&[rows], b), FLOAT));
        }
        v
    }

    fn kv_cache_layout(&self, module: &str, _k_channels: usize, _v_channels: usize) -> Vec<OutMeta> {
        unreachable!("{module}: C8 is refused for compressed-tensors when the run is planned")
    }

    fn kv_cache_tensors(&self, module: &str, _q: &KvCacheQuant) -> Vec<OutTensor> {
        unreachable!("{module}: C8 is refused for compressed-tensors when the run is planned")
    }

    fn weights_file(&self, k: usize, n: usize) -> String {
        if n == 1 {
            format!("{WEIGHTS}.safetensors")
        } else {
            format!("{WEIGHTS}-{:05}-of-{:05}.safetensors", k + 1, n)
        }
    }

    fn index_file(&self) -> &'static str {
        INDEX
    }

    fn is_output_file(&self, name: &str) -> bool {
        name == INDEX || (name.starts_with(WEIGHTS) && name.ends_with(".safetensors"))
    }

    fn metadata_files(
        &self,
        config: &Value,
        _outputs: &[OutMeta],
        linears: &[(String, QuantSpec)],
        float_linears: &[String],
        // A folded rotation needs nothing at load time; compressed-tensors has no place for the matrix.
        _rotation: Option<ArrayView2<f32>>,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let mut c = super::config_without_quantization(config);
        c["quantization_config"] = self.quantization_config(linears, float_linears)?;
        Ok(vec![("config.json".to_string(), json_bytes(&c)?)])
    }

    fn format_name(&self) -> &'static str {
        "compressed-tensors"
    }
}

impl CtExporter {
    /// config.json's `quantization_config`.
    pub fn quantization_config(&self, linears: &[(String, QuantSpec)], float_linears: &[String]) -> Result<Value> {
        // One group per distinct scheme, in first-seen order.
        let mut schemes: Vec<QuantSpec> = Vec::new();
        let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
        for (m, s) in linears {
            let g = match schemes.iter().position(|x| x == s) {
                Some(g) => g,
                None => {
                    schemes.push(*s);
                    schemes.len() - 1
                }
            };
            group_of.insert(m, g);
        }
        let float: BTreeSet<&str> = float_linears.iter().map(|s| s.as_str()).collect();
        // Roles: a module's name relative to its root with its indices generalised; a role whose every
        // module has one group is targeted by one pattern.
        let mut role_groups: BTreeMap<(usize, String), BTreeSet<Option<usize>>> = BTreeMap::new();
        let all = group_of.keys().map(|m| (*m, group_of.get(m).copied())).chain(float.iter().map(|m| (*m, None)));
        for (m, g) in all {
            let (root, tail) = self.split(m);
            role_groups.entry((root, generalise(&tail))).or_default().insert(g);
        }
        let mut targets: Vec<BTreeSet<String>> = vec![BTreeSet::new(); schemes.len()];
        let mut ignore: BTreeSet<String> = BTreeSet::new();
        for (m, g) in group_of.iter().map(|(m, g)| (*m, Some(*g))).chain(float.iter().map(|m| (*m, None))) {
            let (root, tail) = self.split(m);
            let role = generalise(&tail);
            let uniform = role_groups[&(root, role.clone())].len() == 1;
            let exact = regex_escape(&tail);
            let pattern = self.pattern(root, if uniform { &role } else { &exact });
            match g {
                Some(g) => targets[g].insert(pattern),
                None => ignore.insert(pattern),
            };
        }
        let mut groups = Map::new();
        let mut formats = BTreeSet::new();
        for (g, s) in schemes.iter().enumerate() {
            let ct = Ct::of(s)?;
            formats.insert(ct.format());
            groups.insert(format!("group_{g}"), scheme_json(ct, s, targets[g].iter().cloned().collect()));
        }
        let format = match formats.len() {
            1 => formats.into_iter().next().unwrap(),
            0 => "dense",
            _ => "mixed-precision",
        };
        Ok(json!({
            "quant_method": "compressed-tensors",
            "format": format,
            "quantization_status": "compressed",
            "config_groups": groups,
            "ignore": ignore.into_iter().collect::<Vec<_>>(),
            "kv_cache_scheme": null,
            "global_compression_ratio": null,
            "sparsity_config": {},
            "transform_config": {},
        }))
    }

    /// The root (index into `roots`, or `usize::MAX` when none applies) a module lives under, and its
    /// name relative to it.
    fn split(&self, module: &str) -> (usize, String) {
        let mut best: Option<(usize, &str)> = None;
        for (i, (root, _)) in self.roots.iter().enumerate() {
            let rest = if module == root { Some("") } else { module.strip_prefix(&format!("{root}.")) };
            if let Some(rest) = rest {
                if best.is_none_or(|(b, _)| self.roots[b].0.len() < root.len()) {
                    best = Some((i, rest));
                }
            }
        }
        match best {
            Some((i, rest)) => (i, rest.to_string()),
            None => (usize::MAX, module.to_string()),
        }
    }

    /// `re:` pattern for a tail (already a regex) under root `root`: any prefix, then one of the last name
    /// segments the root has in its spellings (`model`, `language_model`, `visual`, …), then the tail.
    fn pattern(&self, root: usize, tail: &str) -> String {
        if root == usize::MAX {
            return format!("re:^{tail}$");
        }
        let mut alts: BTreeSet<String> = BTreeSet::new();
        for s in &self.roots[root].1 {
            alts.insert(regex_escape(s.rsplit('.').next().unwrap_or(s)));
        }
        // vLLM names a VL model's text model `language_model.model`: its last segment is `model`.
        let alts: Vec<String> = alts.into_iter().collect();
        let head = if alts.len() == 1 { alts[0].clone() } else { format!("(?:{})", alts.join("|")) };
        if tail.is_empty() {
            format!("re:(?:.*\\.)?{head}$")
        } else {
            format!("re:(?:.*\\.)?{head}\\.{tail}$")
        }
    }
}

/// A tail with every numeric path segment replaced by `\d+`, regex-escaped.
fn generalise(tail: &str) -> String {
    tail.split('.')
        .map(
            |s| {
                if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                    "\\d+".to_string()
                } else {
                    regex_escape(s)
                }
            },
        )
        .collect::<Vec<_>>()
        .join("\\.")
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn scheme_json(ct: Ct, spec: &QuantSpec, targets: Vec<String>) -> Value {
    let args = |bits: u8, strategy: &str, group: Option<usize>, symmetric: bool, dynamic: bool, observer: Value| {
        json!({
            "num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group,
            "strategy": strategy, "block_structure": null, "dynamic": dynamic, "actorder": null,
            "observer": observer, "observer_kwargs": {},
        })
    };
    let (weights, input) = match ct {
        Ct::Int { static_symmetric: None } => {
            (args(8, "channel", None, true, false, json!("minmax")), args(8, "token", None, true, true, Value::Null))
        }
        Ct::Int { static_symmetric: Some(sym) } => (
            args(8, "channel", None, true, false, json!("minmax")),
            args(8, "tensor", None, sym, false, json!("minmax")),
        ),
        Ct::Pack { bits, group } => {
            let strategy = if group.is_some() { "group" } else { "channel" };
            (args(bits, strategy, group, true, false, json!("minmax")), Value::Null)
        }
    };
    let _ = spec;
    json!({
        "targets": targets,
        "weights": weights,
        "input_activations": input,
        "output_activations": null,
        "format": ct.format(),
    })
}

/// Packs int values (row-major, `cols` per row) of `bits` bits into little-endian int32 words, row by row:
/// each value offset by `2^(bits-1)`, value `i` of a row at bit `i·bits` of the row's words
/// (compressed-tensors' `pack_to_int32`, `packed_dim=1`).
pub fn pack(q: &[i8], rows: usize, cols: usize, bits: u8) -> Vec<u8> {
    let words = packed_cols(cols, bits);
    let (offset, mask) = (1i32 << (bits - 1), (1u64 << bits) - 1);
    let mut out = Vec::with_capacity(rows * words * 4);
    for r in 0..rows {
        let mut row = vec![0u32; words];
        for (i, &v) in q[r * cols..(r + 1) * cols].iter().enumerate() {
            let u = ((v as i32 + offset) as u64) & mask;
            let bit = i * bits as usize;
            row[bit / 32] |= (u << (bit % 32)) as u32;
            if bit % 32 + bits as usize > 32 {
                row[bit / 32 + 1] |= (u >> (32 - bit % 32)) as u32;
            }
        }
        out.extend(row.iter().flat_map(|w| w.to_le_bytes()));
    }
    out
}

/// The plan-time refusals of the format: routed experts, and biases that only smoothing's shift creates.
/// (Schemes and shapes are refused per linear by [`CtExporter::check_linear`].)
pub fn plan_problems(quantized: &[(String, QuantSpec)], computed: &[String], shift: bool) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((m, _)) = quantized.iter().find(|(m, _)| LayerKind::of(m) == LayerKind::Expert) {
        out.push(format!(
            "{m} is a routed MoE expert: lamina writes experts split, and compressed-tensors' loaders (transformers, vLLM) read fused expert tensors; use the Ascend format (--save_format ascend) for MoE models"
        ));
    }
    if shift || !computed.is_empty() {
        out.push(format!(
            "the recipe's smoothing subtracts a shift (m2 or iter_smooth with shift), which adds biases to norms and linears that have none{}: compressed-tensors keeps the model's modules and has no place for them; use a recipe with smooth_quant (the bundled compressed-tensors recipe, `--quant_type w8a8` with `--save_format compressed-tensors`, is one)",
            computed.first().map(|c| format!(" ({c}, …)")).unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn, ActRange};

    /// compressed-tensors' `unpack_from_int32(value, num_bits, shape)`, written out: element `i` of a row
    /// from the global bit position `i·bits`, minus the offset.
    fn unpack(words: &[u32], rows: usize, cols: usize, bits: u8) -> Vec<i8> {
        let per = packed_cols(cols, bits);
        let mut q = Vec::new();
        for r in 0..rows {
            let row = &words[r * per..(r + 1) * per];
            for i in 0..cols {
                let bit = i * bits as usize;
                let mut v = (row[bit / 32] as u64) >> (bit % 32);
                if bit % 32 + bits as usize > 32 {
                    v |= (row[bit / 32 + 1] as u64) << (32 - bit % 32);
                }
                q.push(((v & ((1 << bits) - 1)) as i32 - (1 << (bits - 1))) as i8);
            }
        }
        q
    }

    #[test]
    fn packing_matches_compressed_tensors() {
        for bits in [4u8, 8] {
            let (rows, cols) = (3, 40);
            let lim = (1i32 << (bits - 1)) as i64;
            let q: Vec<i8> = (0..rows * cols).map(|i| ((i as i64 * 7919) % (2 * lim) - lim) as i8).collect();
            let bytes = pack(&q, rows, cols, bits);
            assert_eq!(bytes.len(), rows * packed_cols(cols, bits) * 4);
            let words: Vec<u32> = bytes.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(unpack(&words, rows, cols, bits), q, "{bits} bits");
        }
        // A known word: 4-bit 0..8 are the nibbles 8..15, lowest first (pack_to_int32's offset of 8).
        assert_eq!(pack(&[0, 1, 2, 3, 4, 5, 6, 7], 1, 8, 4), 0xFEDC_BA98u32.to_le_bytes());
        // 8-bit: -128 → 0, 127 → 255, four per word.
        assert_eq!(pack(&[-128, 127, 0, 1], 1, 4, 8), [0u8, 255, 128, 129]);
    }

    fn linear(preset: &str, bias: bool) -> QuantizedLinear {
        let spec = QuantSpec::preset(preset).unwrap();
        let (rows, cols) = (4, 256);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        QuantizedLinear {
            spec,
            weight: rtn::quantize(&w, rows, cols, &spec),
            bias: bias.then(|| vec![0.5; rows]),
            write_bias: bias,
            input: Some(ActRange { scale: 0.05, offset: -3.0 }),
        }
    }

    #[test]
    fn layout_and_tensors_agree() {
        let ex = CtExporter { roots: vec![("model".into(), vec!["model".into()])] };
        for p in ["w8a8", "w8a8_dynamic", "w8a16", "w4a16"] {
            for bias in [false, true] {
                let ql = linear(p, bias);
                ex.check_linear("model.layers.0.mlp.up_proj", &ql.spec, 4, 256).unwrap();
                let planned = ex.linear_layout("m", &ql.spec, 4, 256, bias);
                let made: Vec<_> = ex.linear_tensors("m", &ql).iter().map(|t| t.out_meta()).collect();
                assert_eq!(planned, made, "{p} {bias}");
            }
        }
        let w4a8 = QuantSpec::preset("w4a8_dynamic").unwrap();
        assert!(ex.check_linear("m", &w4a8, 4, 256).unwrap_err().to_string().contains("W4A8_DYNAMIC"));
        let w4a16 = QuantSpec::preset("w4a16").unwrap();
        assert!(ex.check_linear("m", &w4a16, 4, 192).unwrap_err().to_string().contains("groups of 128"));
    }

    #[test]
    fn config_groups_target_roles_in_every_spelling() {
        let ex = CtExporter {
            roots: vec![
                ("model".into(), vec!["model".into(), "model.language_model".into()]),
                ("lm_head".into(), vec!["lm_head".into()]),
                ("visual".into(), vec!["visual".into(), "model.visual".into()]),
            ],
        };
        let (a, b) = (QuantSpec::preset("w8a8").unwrap(), QuantSpec::preset("w8a16").unwrap());
        let mut linears = Vec::new();
        for l in 0..3 {
            linears.push((format!("model.layers.{l}.self_attn.q_proj"), a));
            linears.push((format!("model.layers.{l}.mlp.down_proj"), if l == 1 { a } else { b }));
            linears.push((format!("visual.blocks.{l}.attn.qkv"), a));
        }
        let float = vec!["lm_head".to_string(), "visual.merger.mlp.0".to_string()];
        let c = ex.quantization_config(&linears, &float).unwrap();
        assert_eq!(c["format"], "mixed-precision");
        assert_eq!(c["quantization_status"], "compressed");
        let g0: Vec<&str> =
            c["config_groups"]["group_0"]["targets"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let text = "re:(?:.*\\.)?(?:language_model|model)\\.layers\\.";
        assert!(g0.contains(&format!("{text}\\d+\\.self_attn\\.q_proj$").as_str()), "{g0:?}");
        assert!(g0.contains(&"re:(?:.*\\.)?visual\\.blocks\\.\\d+\\.attn\\.qkv$"), "{g0:?}");
        // down_proj differs by layer: per-layer patterns.
        assert!(g0.contains(&format!("{text}1\\.mlp\\.down_proj$").as_str()), "{g0:?}");
        assert_eq!(c["config_groups"]["group_1"]["format"], "pack-quantized");
        assert_eq!(c["config_groups"]["group_0"]["input_activations"]["strategy"], "tensor");
        assert_eq!(c["config_groups"]["group_0"]["input_activations"]["symmetric"], false);
        let ignore: Vec<&str> = c["ignore"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(ignore.contains(&"re:(?:.*\\.)?lm_head$") && ignore.iter().any(|i| i.contains("merger")), "{ignore:?}");
    }
}
