//! Reading an Ascend-format output back as the NPU will compute it: every quantized linear
//! becomes its dequantized weight, the bias the kernel effectively adds, and the activation
//! quantizer it applies; with C8, what each attention caches is rounded to its int8 grid. `lamina
//! eval` runs the model this way.

use super::ascend::DESCRIPTION;
use super::rules;
use crate::io::safetensors::SafetensorsSet;
use crate::model::nn::Linear;
use crate::model::weights::Weights;
use crate::quant::act_sim::ActSim;
use crate::quant::kv_cache::{ChannelQuant, KvCacheQuant};
use crate::quant::ActRange;
use crate::tensor::{decode_f32, DType};
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct AscendModel {
    pub dir: PathBuf,
    /// The description's global `group_size` (W4A16's group length).
    pub group_size: usize,
    /// Tensor name → quantization type.
    pub description: BTreeMap<String, String>,
    /// The description's `kv_cache_type` is "C8": the KV caches are int8.
    pub c8: bool,
    tensors: SafetensorsSet,
}

/// A quantized linear as the kernel computes it.
#[derive(Debug, Clone)]
pub struct DequantizedLinear {
    pub linear: Linear,
    pub act: ActSim,
}

impl AscendModel {
    pub fn open(dir: &Path) -> Result<AscendModel> {
        let desc_path = dir.join(DESCRIPTION);
        let desc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(
            &std::fs::read(&desc_path)
                .with_context(|| format!("cannot read {} (is this a lamina output?)", desc_path.display()))?,
        )
        .with_context(|| format!("{} is not valid JSON", desc_path.display()))?;
        let group_size = desc.get("group_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let c8 = desc.get("kv_cache_type").and_then(|v| v.as_str()) == Some(rules::C8);
        let mut description: BTreeMap<String, String> =
            desc.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string()))).collect();
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with(super::ascend::WEIGHTS) && n.ends_with(".safetensors")
            })
            .collect();
        names.sort();
        if names.is_empty() {
            bail!("{} holds no quant_model_weights*.safetensors", dir.display());
        }
        let tensors = SafetensorsSet::open(dir, &names)?;
        // The names vLLM-Ascend looks some linears up under (rules::lookup_aliases) hold no tensors.
        let model_type = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|c| c.get("model_type").and_then(|v| v.as_str()).map(str::to_string))
            .unwrap_or_default();
        let stored = description.iter().filter(|(n, _)| tensors.contains(n)).map(|(n, k)| (n.as_str(), k.as_str()));
        let aliases = rules::lookup_alias_entries(&model_type, stored).unwrap_or_default();
        description.retain(|k, _| tensors.contains(k) || !aliases.contains_key(k));
        Ok(AscendModel { dir: dir.to_path_buf(), group_size, c8, description, tensors })
    }

    /// A float or integer tensor's values as f32.
    fn numbers(&self, name: &str) -> Result<Vec<f32>> {
        let (dtype, _, bytes) = self.tensors.raw(name)?;
        match dtype {
            DType::I8 | DType::I32 | DType::I64 => {
                Ok(crate::tensor::decode_i64(dtype, bytes)?.into_iter().map(|v| v as f32).collect())
            }
            _ => decode_f32(dtype, bytes),
        }
    }

    /// The C8 quantizers of the attention modules under `prefix` (names relative to it, `self_attn`), when
    /// the description switches C8 on: every `ATTN.k_proj.kv_cache_scale` it lists, with its three siblings.
    /// A single scale or offset (per tensor) is broadcast over `channels`.
    pub fn kv_caches(&self, prefix: &str) -> Result<BTreeMap<String, KvCacheQuant>> {
        let mut out = BTreeMap::new();
        if !self.c8 {
            return Ok(out);
        }
        let key = format!(".{}", rules::C8_TENSORS[0].0);
        for name in self.description.range(prefix.to_string()..).map(|(n, _)| n) {
            let Some(rel) = name.strip_prefix(prefix) else { break };
            let Some(attn) = rel.strip_suffix(&key) else { continue };
            let module = format!("{prefix}{attn}");
            let get = |sfx: &str| -> Result<Vec<f32>> {
                self.numbers(&format!("{module}.{sfx}")).with_context(|| format!("the C8 scales of {module}"))
            };
            let side = |proj: &str| -> Result<ChannelQuant> {
                let (mut scale, mut offset) =
                    (get(&format!("{proj}.kv_cache_scale"))?, get(&format!("{proj}.kv_cache_offset"))?);
                let n = scale.len().max(offset.len());
                for v in [&mut scale, &mut offset] {
                    if v.len() == 1 {
                        *v = vec![v[0]; n];
                    }
                }
                if scale.len() != offset.len() {
                    bail!("{module}.{proj}: {} C8 scales but {} offsets", scale.len(), offset.len());
                }
                Ok(ChannelQuant { scale, offset })
            };
            out.insert(attn.to_string(), KvCacheQuant { k: side("k_proj")?, v: side("v_proj")? });
        }
        Ok(out)
    }

    /// The tensors under `prefix` that `keep` accepts, as a float forward reads them, names
    /// relative to `prefix`, plus the activation quantizers of the quantized linears.
    pub fn weights(&self, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Result<(Weights, BTreeMap<String, ActSim>)> {
        let mut w = Weights { prefix: prefix.to_string(), map: BTreeMap::new() };
        let mut acts = BTreeMap::new();
        for (name, kind) in self.description.range(prefix.to_string()..) {
            let Some(rel) = name.strip_prefix(prefix) else { break };
            if !keep(name) {
                continue;
            }
            if kind == "FLOAT" {
                let (shape, v) = self.tensors.f32s(name)?;
                // A W8A8 linear's float bias is inside its quant_bias; its weight decides.
                let module = rel.strip_suffix(".bias");
                if module
                    .is_some_and(|m| self.description.get(&format!("{prefix}{m}.weight")).is_some_and(|k| k == "W8A8"))
                {
                    continue;
                }
                w.map.insert(rel.to_string(), ArrayD::from_shape_vec(IxDyn(&shape), v)?);
            } else if let Some(module) = rel.strip_suffix(".weight").or_else(|| rel.strip_suffix(".weight_packed")) {
                let d = self.linear(&format!("{prefix}{module}"), kind)?;
                w.map.insert(format!("{module}.weight"), d.linear.weight.into_dyn());
                if let Some(b) = d.linear.bias {
                    w.map.insert(format!("{module}.bias"), b.into_dyn());
                }
                acts.insert(module.to_string(), d.act);
            }
        }
        Ok((w, acts))
    }

    /// Dequantizes the linear `module` of type `kind`.
    pub fn linear(&self, module: &str, kind: &str) -> Result<DequantizedLinear> {
        let t = |s: &str| format!("{module}.{s}");
        let bias = || -> Result<Option<Array1<f32>>> {
            if self.tensors.contains(&t("bias")) {
                Ok(Some(Array1::from_vec(self.tensors.f32s(&t("bias"))?.1)))
            } else {
                Ok(None)
            }
        };
        match kind {
            "W8A8" | "W8A8S" => {
                let (shape, q) = self.tensors.ints(&t("weight"))?;
                let (rows, cols) = (shape[0], shape[1]);
                let input = ActRange {
                    scale: self.tensors.f32s(&t("input_scale"))?.1[0],
                    offset: self.tensors.f32s(&t("input_offset"))?.1[0],
                };
                let (dtype, _, bytes) = self.tensors.raw(&t("deq_scale"))?;
                let deq: Vec<f32> = match dtype {
                    DType::I64 => {
                        crate::tensor::decode_i64(dtype, bytes)?.iter().map(|&b| f32::from_bits(b as u32)).collect()
                    }
                    _ => decode_f32(dtype, bytes)?,
                };
                let quant_bias = self.tensors.ints(&t("quant_bias"))?.1;
                let mut weight = Array2::<f32>::zeros((rows, cols));
                let mut effective = Array1::<f32>::zeros(rows);
                for r in 0..rows {
                    let ws = deq[r] / input.scale;
                    let row = &q[r * cols..(r + 1) * cols];
                    let qsum: f64 = row.iter().map(|&x| x as f64).sum();
                    for c in 0..cols {
                        weight[[r, c]] = row[c] as f32 * ws;
                    }
                    // out = deq · (Σ q_x q_w + quant_bias), with q_x = x̂/s + offset.
                    effective[r] = (deq[r] as f64 * (quant_bias[r] as f64 + input.offset as f64 * qsum)) as f32;
                }
                Ok(DequantizedLinear { linear: Linear { weight, bias: Some(effective) }, act: ActSim::Static(input) })
            }
            "W8A8_DYNAMIC" | "W8A16" | "W4A4_DYNAMIC" => {
                let (shape, q) = self.tensors.ints(&t("weight"))?;
                let (rows, cols) = (shape[0], shape[1]);
                let (sshape, scale) = self.tensors.f32s(&t("weight_scale"))?;
                let offset = self.tensors.f32s(&t("weight_offset"))?.1;
                let groups = sshape[1];
                let g = cols.div_ceil(groups);
                let weight = Array2::from_shape_fn((rows, cols), |(r, c)| {
                    (q[r * cols + c] as f32 - offset[r * groups + c / g]) * scale[r * groups + c / g]
                });
                let act = match kind {
                    "W8A16" => ActSim::None,
                    "W4A4_DYNAMIC" => ActSim::PerToken { bits: 4 },
                    _ => ActSim::PerToken { bits: 8 },
                };
                Ok(DequantizedLinear { linear: Linear { weight, bias: bias()? }, act })
            }
            "W4A8_DYNAMIC" => {
                // [out/2, in] bytes: row 2r in the low nibble, row 2r+1 in the high one.
                let (shape, packed) = self.tensors.ints(&t("weight"))?;
                let (half, cols) = (shape[0], shape[1]);
                let scale = self.tensors.f32s(&t("weight_scale"))?.1;
                let nibble = |b: i64, hi: bool| -> f32 {
                    let v = if hi { (b >> 4) & 0xF } else { b & 0xF };
                    (if v >= 8 { v - 16 } else { v }) as f32
                };
                let weight = Array2::from_shape_fn((2 * half, cols), |(r, c)| {
                    nibble(packed[(r / 2) * cols + c] & 0xFF, r % 2 == 1) * scale[r]
                });
                Ok(DequantizedLinear { linear: Linear { weight, bias: bias()? }, act: ActSim::PerToken { bits: 8 } })
            }
            "W4A16" => {
                // [out, in/8] int32 words: element c is q + 8 in bits 4·(c % 8) of word c / 8.
                let (shape, words) = self.tensors.ints(&t("weight_packed"))?;
                let (rows, cols) = (shape[0], shape[1] * 8);
                let (sshape, scale) = self.tensors.f32s(&t("weight_scale"))?;
                let groups = sshape[1];
                let g = if self.group_size > 0 { self.group_size } else { cols.div_ceil(groups) };
                // Asymmetric weights carry their zero points: w = (q - offset) * scale.
                let offset = match self.tensors.contains(&t("weight_offset")) {
                    true => self.tensors.f32s(&t("weight_offset"))?.1,
                    false => vec![0.0; rows * groups],
                };
                let weight = Array2::from_shape_fn((rows, cols), |(r, c)| {
                    let word = words[r * (cols / 8) + c / 8] as u32;
                    let q = ((word >> (4 * (c % 8))) & 0xF) as f32 - 8.0;
                    (q - offset[r * groups + c / g]) * scale[r * groups + c / g]
                });
                Ok(DequantizedLinear { linear: Linear { weight, bias: bias()? }, act: ActSim::None })
            }
            other => bail!("{module}: reading {other} weights back is not supported"),
        }
    }
}
