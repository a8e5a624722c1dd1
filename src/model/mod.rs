//! What a checkpoint is: its family, where its parts live, and the units it is processed in.

pub mod config;
pub mod decoder;
pub mod fp8;
pub mod layout;
pub mod load;
pub mod matrix;
pub mod moe;
pub mod nn;
pub mod rope;
pub mod vision;
pub mod weights;

use crate::tensor::{DType, TensorMeta};
use anyhow::{bail, Context, Result};
use config::TextConfig;
use layout::{Family, Layout, UnitKind};
use moe::{ExpertPart, FusedLayout};
use serde_json::Value;
use std::collections::BTreeMap;

/// A model as lamina understands it.
#[derive(Debug, Clone)]
pub struct Model {
    pub family: Family,
    pub layout: Layout,
    pub text: TextConfig,
    pub config: Value,
    /// `quantization_config.weight_block_size` of an FP8 block-quantized checkpoint.
    pub fp8: Option<fp8::BlockSize>,
}

impl Model {
    /// Recognises the family from config.json (or `model_type_override`) and resolves the
    /// naming layout against the checkpoint's tensor names (empty for a config alone).
    pub fn new(config: &Value, model_type_override: Option<&str>, names: &[&str]) -> Result<Model> {
        let family = match model_type_override.and_then(Family::from_model_type) {
            Some(f) => f,
            None => {
                match Family::detect(config) {
                    Some(f) => f,
                    None => {
                        let t = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("(none)");
                        let known: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
                        if names.is_empty() {
                            bail!("unknown model_type {t:?} in config.json (known: {}); with a config alone there are no tensor names to fall back on", known.join(", "));
                        }
                        Layout::resolve(Family::Generic, Family::Generic, names).with_context(|| {
                        format!("unknown model_type {t:?} in config.json (known: {}) and no generic decoder layout fits", known.join(", "))
                    })?;
                        Family::Generic
                    }
                }
            }
        };
        let text = TextConfig::from_json(config).context("reading the text model's config")?;
        let layout = Layout::for_config(family, config, names)?.with_mtp(layout::MtpLayout::of(family, &text));
        let fp8 = fp8::Fp8Config::from_config(config)?;
        Ok(Model { family, layout, text, config: config.clone(), fp8 })
    }
}

/// Where a logical tensor's bytes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A tensor stored under this name.
    Stored(String),
    /// A tensor calibration creates (a norm's bias from outlier suppression's shift); it has no
    /// bytes in the checkpoint.
    Computed(String),
    /// One expert's linear cut out of a fused 3D tensor.
    Expert { fused: String, fused_shape: Vec<usize>, layout: FusedLayout, part: ExpertPart, expert: usize },
    /// Rows `start..start + rows` of a stored tensor: one linear of a row-wise fused pair (GLM-4's
    /// `mlp.gate_up_proj` holds gate's rows, then up's), or that linear's bias.
    Rows { fused: String, fused_shape: Vec<usize>, start: usize, rows: usize },
    /// A linear stored in FP8 (`weight`, `F8_E4M3`) with its block scale `scale`
    /// (`weight_scale_inv`), dequantized as it is read (see [`fp8`]).
    BlockFp8 { weight: String, scale: String, block: [usize; 2] },
}

impl Source {
    pub fn stored_name(&self) -> &str {
        match self {
            Source::Stored(n) | Source::Computed(n) => n,
            Source::Expert { fused, .. } | Source::Rows { fused, .. } => fused,
            Source::BlockFp8 { weight, .. } => weight,
        }
    }
}

/// A tensor as the pipeline sees it: stored, or derived from a fused tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalTensor {
    pub meta: TensorMeta,
    pub source: Source,
}

impl LogicalTensor {
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    /// The module name of a linear layer's weight (`x.q_proj` for `x.q_proj.weight`).
    pub fn linear_module(&self) -> Option<&str> {
        if layout::is_linear_weight(&self.meta.name, &self.meta.shape) && self.meta.dtype.is_float() {
            self.meta.name.strip_suffix(".weight")
        } else {
            None
        }
    }
}

/// An error about one stored tensor, which the caller can place in its file (the model module sees
/// tensor names, not files): `pipeline` adds the file's path.
#[derive(Debug)]
pub struct TensorError {
    pub tensor: String,
    pub error: anyhow::Error,
}

impl TensorError {
    pub fn new(tensor: &str, error: anyhow::Error) -> TensorError {
        TensorError { tensor: tensor.to_string(), error }
    }
}

impl std::fmt::Display for TensorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for TensorError {}

/// A group of tensors processed, written and released together.
#[derive(Debug, Clone)]
pub struct Unit {
    pub kind: UnitKind,
    pub name: String,
    /// Sorted by name.
    pub tensors: Vec<LogicalTensor>,
    /// The stored tensors this unit reads (fused expert tensors once), and their bytes.
    pub stored: Vec<String>,
    pub stored_bytes: u64,
}

/// Groups a checkpoint's tensors into units, splitting fused MoE experts and pairing FP8 weights
/// with their block scales (a scale is read with its weight, never a tensor of its own).
pub fn build_units(model: &Model, inventory: &[TensorMeta]) -> Result<Vec<Unit>> {
    let fp8 = fp8::pair_scales(model.fp8.as_ref(), inventory)?;
    let float_dtype = fp8::float_dtype(&model.config);
    let mut groups: BTreeMap<UnitKind, Vec<&TensorMeta>> = BTreeMap::new();
    for t in inventory {
        groups.entry(model.layout.classify(&t.name)).or_default().push(t);
    }
    let mut units = Vec::with_capacity(groups.len());
    for (kind, metas) in groups {
        let mut tensors = Vec::with_capacity(metas.len());
        let by_name: BTreeMap<&str, &TensorMeta> = metas.iter().map(|m| (m.name.as_str(), *m)).collect();
        let layer = match kind {
            UnitKind::TextLayer(i) => Some(model.layout.text_layer(i)),
            _ => None,
        };
        let split_of = |name: &str| {
            let l = layer.as_deref()?;
            let rel = name.strip_prefix(l)?.strip_prefix('.')?;
            layout::row_splits(model.layout.text_family)
                .iter()
                .find(|(fused, _)| rel.strip_prefix(fused).is_some_and(|r| r == ".weight" || r == ".bias"))
        };
        for m in &metas {
            if let Some((fused, parts)) = split_of(&m.name) {
                if fp8.weights.contains_key(&m.name) {
                    let e = anyhow::anyhow!(
                        "tensor {} is FP8 and fused by rows; lamina splits only float fused linears",
                        m.name
                    );
                    return Err(TensorError::new(&m.name, e).into());
                }
                tensors.extend(split_rows(m, layer.as_deref().unwrap(), fused, parts)?);
            } else if let Some(prefix) = m.name.strip_suffix(moe::GATE_UP) {
                tensors.extend(split_experts(model, prefix, m, &by_name)?);
            } else if m.name.ends_with(moe::DOWN)
                && by_name.contains_key(format!("{}{}", m.name.strip_suffix(moe::DOWN).unwrap(), moe::GATE_UP).as_str())
            {
                // Split together with its gate_up partner.
            } else if fp8.scales.contains(&m.name) {
                // Read with its FP8 weight.
            } else if let Some(f) = fp8.weights.get(&m.name) {
                tensors.push(LogicalTensor {
                    meta: TensorMeta::new(m.name.clone(), float_dtype, &m.shape),
                    source: Source::BlockFp8 { weight: m.name.clone(), scale: f.scale.clone(), block: f.block },
                });
            } else {
                tensors.push(LogicalTensor { meta: (*m).clone(), source: Source::Stored(m.name.clone()) });
            }
        }
        tensors.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        let stored: Vec<String> = metas.iter().map(|m| m.name.clone()).collect();
        let stored_bytes = metas.iter().map(|m| m.nbytes()).sum();
        units.push(Unit { kind, name: model.layout.unit_name(kind), tensors, stored, stored_bytes });
    }
    Ok(units)
}

/// A row-wise fused linear's weight or bias (`{layer}.{fused}.{suffix}`) as its parts' tensors:
/// part `k` of `n` takes the `k`-th `n`-th of the rows and is named `{layer}.{part}.{suffix}`.
fn split_rows(t: &TensorMeta, layer: &str, fused: &str, parts: &[&str]) -> Result<Vec<LogicalTensor>> {
    let suffix = &t.name[layer.len() + fused.len() + 2..];
    let n = parts.len();
    let total = t.shape.first().copied().unwrap_or(0);
    if t.shape.is_empty() || t.shape.len() > 2 || total % n != 0 {
        bail!(
            "tensor {} has shape {:?}; lamina splits it into {n} equal blocks of rows ({}) as the loaders expect",
            t.name,
            t.shape,
            parts.join(", ")
        );
    }
    let rows = total / n;
    Ok(parts
        .iter()
        .enumerate()
        .map(|(k, part)| {
            let mut shape = t.shape.clone();
            shape[0] = rows;
            LogicalTensor {
                meta: TensorMeta::new(format!("{layer}.{part}.{suffix}"), t.dtype, &shape),
                source: Source::Rows { fused: t.name.clone(), fused_shape: t.shape.clone(), start: k * rows, rows },
            }
        })
        .collect())
}

fn split_experts(
    model: &Model,
    prefix: &str,
    gate_up: &TensorMeta,
    by_name: &BTreeMap<&str, &TensorMeta>,
) -> Result<Vec<LogicalTensor>> {
    let down_name = format!("{prefix}{}", moe::DOWN);
    let down = by_name
        .get(down_name.as_str())
        .with_context(|| format!("fused {} has no partner {down_name}", gate_up.name))?;
    let moe =
        model.text.moe.as_ref().with_context(|| {
            format!("{} is a fused expert tensor but config.json declares no experts", gate_up.name)
        })?;
    if gate_up.shape.len() != 3 || down.shape.len() != 3 {
        bail!("fused experts {} {:?} and {} {:?} are not 3D", gate_up.name, gate_up.shape, down.name, down.shape);
    }
    let (hidden, inter) = (model.text.hidden_size, moe.moe_intermediate_size);
    let layout = moe::decide_layout(&gate_up.shape, &down.shape, moe.num_experts, hidden, inter)
        .with_context(|| format!("cannot split the fused experts {} and {}", gate_up.name, down.name))?;
    let mut out = Vec::with_capacity(3 * moe.num_experts);
    for j in 0..moe.num_experts {
        for part in [ExpertPart::Gate, ExpertPart::Up, ExpertPart::Down] {
            let fused = if part == ExpertPart::Down { *down } else { gate_up };
            out.push(LogicalTensor {
                meta: TensorMeta::new(
                    format!("{prefix}mlp.experts.{j}.{}.weight", part.module()),
                    fused.dtype,
                    &moe::expert_shape(part, hidden, inter),
                ),
                source: Source::Expert {
                    fused: fused.name.clone(),
                    fused_shape: fused.shape.clone(),
                    layout,
                    part,
                    expert: j,
                },
            });
        }
    }
    Ok(out)
}

/// The bf16 inventory of a checkpoint that only exists on paper (a config alone).
pub fn paper_inventory(model: &Model) -> Result<Vec<TensorMeta>> {
    Ok(layout::synthesize_inventory(model.family, &model.config)?
        .into_iter()
        .map(|(n, s)| TensorMeta::new(n, DType::BF16, &s))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `-hf` InternVL conversion (transformers' names, tests/fixtures/gen/internvl_hf.py) is read
    /// as the `internvl` family: its text model by `text_config`, its tower and projector as vision
    /// units, nothing left over as "other tensors".
    #[test]
    fn hf_internvl_is_read_as_internvl() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/internvl_hf");
        let ckpt = crate::io::checkpoint::Checkpoint::open(&dir).unwrap();
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, None, &names).unwrap();
        assert_eq!((model.family, model.layout.text_family), (Family::InternVl, Family::Qwen3));
        let inventory: Vec<TensorMeta> = ckpt.names().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory).unwrap();
        assert!(units.iter().all(|u| u.kind != UnitKind::Other), "every tensor belongs to a unit");
        let blocks = units.iter().filter(|u| matches!(u.kind, UnitKind::VisionBlock(_))).count();
        assert_eq!(blocks, 2);
    }

    #[test]
    fn row_fused_linears_split_into_their_parts() {
        let config = serde_json::json!({"model_type": "glm4", "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 1, "vocab_size": 8, "intermediate_size": 3});
        let model = Model::new(&config, None, &[]).unwrap();
        let fused = TensorMeta::new("model.layers.0.mlp.gate_up_proj.weight", DType::BF16, &[6, 4]);
        let units = build_units(&model, std::slice::from_ref(&fused)).unwrap();
        let names: Vec<(&str, &Source)> = units[0].tensors.iter().map(|t| (t.name(), &t.source)).collect();
        let rows = |start| Source::Rows { fused: fused.name.clone(), fused_shape: vec![6, 4], start, rows: 3 };
        assert_eq!(
            names,
            vec![("model.layers.0.mlp.gate_proj.weight", &rows(0)), ("model.layers.0.mlp.up_proj.weight", &rows(3))]
        );
        assert_eq!(units[0].tensors[1].meta.shape, vec![3, 4]);
        let odd = TensorMeta::new("model.layers.0.mlp.gate_up_proj.weight", DType::BF16, &[5, 4]);
        let e = build_units(&model, &[odd]).unwrap_err().to_string();
        assert!(e.contains("gate_up_proj") && e.contains("[5, 4]"), "{e}");
    }
}
