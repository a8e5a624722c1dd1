//! What a checkpoint is: its family, where its parts live, and the units it is processed in.

pub mod config;
pub mod decoder;
pub mod layout;
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
        let layout = Layout::for_config(family, config, names)?;
        let text = TextConfig::from_json(config).context("reading the text model's config")?;
        Ok(Model { family, layout, text, config: config.clone() })
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
}

impl Source {
    pub fn stored_name(&self) -> &str {
        match self {
            Source::Stored(n) | Source::Computed(n) => n,
            Source::Expert { fused, .. } => fused,
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

/// Groups a checkpoint's tensors into units, splitting fused MoE experts.
pub fn build_units(model: &Model, inventory: &[TensorMeta]) -> Result<Vec<Unit>> {
    let mut groups: BTreeMap<UnitKind, Vec<&TensorMeta>> = BTreeMap::new();
    for t in inventory {
        groups.entry(model.layout.classify(&t.name)).or_default().push(t);
    }
    let mut units = Vec::with_capacity(groups.len());
    for (kind, metas) in groups {
        let mut tensors = Vec::with_capacity(metas.len());
        let by_name: BTreeMap<&str, &TensorMeta> = metas.iter().map(|m| (m.name.as_str(), *m)).collect();
        for m in &metas {
            if let Some(prefix) = m.name.strip_suffix(moe::GATE_UP) {
                tensors.extend(split_experts(model, prefix, m, &by_name)?);
            } else if m.name.ends_with(moe::DOWN)
                && by_name.contains_key(format!("{}{}", m.name.strip_suffix(moe::DOWN).unwrap(), moe::GATE_UP).as_str())
            {
                // Split together with its gate_up partner.
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
