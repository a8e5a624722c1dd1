//! Reading an output folder back as its server computes it, whatever its format: every quantized linear
//! becomes its dequantized weight and the activation quantizer the kernel applies. `lamina eval` runs the
//! model this way.

use super::ascend::DESCRIPTION;
use super::ascend_read::AscendModel;
use super::compressed_tensors::INDEX;
use crate::io::safetensors::SafetensorsSet;
use crate::model::weights::Weights;
use crate::quant::act_sim::ActSim;
use crate::quant::kv_cache::KvCacheQuant;
use crate::quant::ActRange;

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An output folder read back for a forward.
pub trait QuantizedOutput {
    fn dir(&self) -> &Path;
    /// The tensors under `prefix` that `keep` accepts, as a float forward reads them (names relative to
    /// `prefix`, quantized linears dequantized), and the activation quantizers of the quantized linears.
    fn weights(&self, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Result<(Weights, BTreeMap<String, ActSim>)>;
    /// The int8 KV-cache quantizers of the attention modules under `prefix` (names relative to it).
    fn kv_caches(&self, _prefix: &str) -> Result<BTreeMap<String, KvCacheQuant>> {
        Ok(BTreeMap::new())
    }
}

impl QuantizedOutput for AscendModel {
    fn dir(&self) -> &Path {
        &self.dir
    }
    fn weights(&self, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Result<(Weights, BTreeMap<String, ActSim>)> {
        AscendModel::weights(self, prefix, keep)
    }
    fn kv_caches(&self, prefix: &str) -> Result<BTreeMap<String, KvCacheQuant>> {
        AscendModel::kv_caches(self, prefix)
    }
}

/// Opens an output folder: the Ascend format (a `quant_model_description.json`) or compressed-tensors (a
/// config.json whose `quantization_config` says so).
pub fn open(dir: &Path) -> Result<Box<dyn QuantizedOutput>> {
    if dir.join(DESCRIPTION).exists() {
        return Ok(Box::new(AscendModel::open(dir)?));
    }
    let config: Option<serde_json::Value> =
        std::fs::read(dir.join("config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let method = config.as_ref().and_then(|c| c.pointer("/quantization_config/quant_method")).and_then(|m| m.as_str());
    if method == Some("compressed-tensors") {
        return Ok(Box::new(CtModel::open(dir)?));
    }
    bail!(
        "{} is not a quantized output lamina reads: it has no {DESCRIPTION} (Ascend format) and its config.json has no compressed-tensors quantization_config",
        dir.display()
    )
}

/// A compressed-tensors output (what lamina writes: int8 `weight` + `weight_scale` [+ `input_scale`,
/// `input_zero_point`], or `weight_packed` + `weight_scale` + `weight_shape`).
pub struct CtModel {
    pub dir: PathBuf,
    tensors: SafetensorsSet,
}

impl CtModel {
    pub fn open(dir: &Path) -> Result<CtModel> {
        let index = dir.join(INDEX);
        let names: Vec<PathBuf> = if index.exists() {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).context("the index has no weight_map")?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Ok(CtModel { dir: dir.to_path_buf(), tensors: SafetensorsSet::open(dir, &names)? })
    }

    /// The dequantized weight of `module` and its activation quantizer.
    fn linear(&self, module: &str) -> Result<(Array2<f32>, ActSim)> {
        let t = |s: &str| format!("{module}.{s}");
        let (sshape, scale) = self.tensors.f32s(&t("weight_scale"))?;
        let groups = *sshape.get(1).unwrap_or(&1);
        if self.tensors.contains(&t("weight_packed")) {
            let (_, shape) = self.tensors.ints(&t("weight_shape"))?;
            let (rows, cols) = (shape[0] as usize, shape[1] as usize);
            let (pshape, words) = self.tensors.ints(&t("weight_packed"))?;
            let per = pshape[1];
            let bits = per * 32 / cols;
            if !matches!(bits, 4 | 8) || per * 32 != cols * bits {
                bail!("{module}: {per} packed words per row of {cols} values is neither 4 nor 8 bits");
            }
            let g = cols / groups;
            let offset = 1i64 << (bits - 1);
            let w = Array2::from_shape_fn((rows, cols), |(r, c)| {
                let bit = c * bits;
                let word = words[r * per + bit / 32] as u32 as u64;
                let q = ((word >> (bit % 32)) & ((1 << bits) - 1)) as i64 - offset;
                q as f32 * scale[r * groups + c / g]
            });
            return Ok((w, ActSim::None));
        }
        let (shape, q) = self.tensors.ints(&t("weight"))?;
        let (rows, cols) = (shape[0], shape[1]);
        let w = Array2::from_shape_fn((rows, cols), |(r, c)| q[r * cols + c] as f32 * scale[r]);
        let act = if self.tensors.contains(&t("input_scale")) {
            let sc = self.tensors.f32s(&t("input_scale"))?.1[0];
            let zp = if self.tensors.contains(&t("input_zero_point")) {
                self.tensors.ints(&t("input_zero_point"))?.1[0]
            } else {
                0
            };
            ActSim::Static(ActRange { scale: sc, offset: zp as f32 })
        } else {
            ActSim::PerToken { bits: 8 }
        };
        Ok((w, act))
    }
}

impl QuantizedOutput for CtModel {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn weights(&self, prefix: &str, keep: &dyn Fn(&str) -> bool) -> Result<(Weights, BTreeMap<String, ActSim>)> {
        let mut w = Weights { prefix: prefix.to_string(), map: BTreeMap::new() };
        let mut acts = BTreeMap::new();
        const QUANT_PARTS: [&str; 5] =
            ["weight_scale", "weight_shape", "input_scale", "input_zero_point", "weight_packed"];
        for name in self.tensors.names_from(prefix) {
            let Some(rel) = name.strip_prefix(prefix) else { break };
            if !keep(name) {
                continue;
            }
            let (module, part) = rel.rsplit_once('.').unwrap_or(("", rel));
            let quantized = self.tensors.contains(&format!("{prefix}{module}.weight_scale"));
            if quantized && (part == "weight" || part == "weight_packed") {
                let (weight, act) =
                    self.linear(&format!("{prefix}{module}")).with_context(|| format!("in {}", self.dir.display()))?;
                w.map.insert(format!("{module}.weight"), weight.into_dyn());
                acts.insert(module.to_string(), act);
            } else if quantized && QUANT_PARTS.contains(&part) {
                continue;
            } else {
                let (shape, v) = self.tensors.f32s(name)?;
                w.map.insert(rel.to_string(), ArrayD::from_shape_vec(IxDyn(&shape), v)?);
            }
        }
        Ok((w, acts))
    }
}
