//! A unit's float weights in memory, looked up by names relative to the unit.

use super::load;
use super::nn::Linear;
use super::{LogicalTensor, Unit};
use crate::io::checkpoint::Checkpoint;
use anyhow::{Context, Result};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use std::collections::BTreeMap;

/// Float tensors by relative name (`self_attn.q_proj.weight` inside `model.layers.3`).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    /// `model.layers.3.` (with the dot), or empty for units whose names are kept whole.
    pub prefix: String,
    pub map: BTreeMap<String, ArrayD<f32>>,
}

impl Weights {
    /// Loads every float tensor of `unit` (experts de-fused) widened to f32, giving each tensor's mapped
    /// pages back once it is widened; names lose `prefix`.
    pub fn load(ckpt: &Checkpoint, unit: &Unit, prefix: &str) -> Result<Weights> {
        Weights::load_tensors(ckpt, unit.tensors.iter(), prefix)
    }

    pub fn load_tensors<'a>(
        ckpt: &Checkpoint,
        tensors: impl Iterator<Item = &'a LogicalTensor>,
        prefix: &str,
    ) -> Result<Weights> {
        let mut map = BTreeMap::new();
        for t in tensors.filter(|t| t.meta.dtype.is_float() && !matches!(t.source, super::Source::Computed(_))) {
            let data = load::f32s(ckpt, t)?;
            // The f32 copy is what is used from now on: the mapped pages go back (and the reader,
            // which stays a bounded distance ahead of what was given back, reads on).
            load::release(ckpt, t);
            let rel = t.name().strip_prefix(prefix).unwrap_or(t.name()).to_string();
            map.insert(rel, ArrayD::from_shape_vec(IxDyn(&t.meta.shape), data)?);
        }
        Ok(Weights { prefix: prefix.to_string(), map })
    }

    pub fn has(&self, rel: &str) -> bool {
        self.map.contains_key(rel)
    }

    pub fn get(&self, rel: &str) -> Result<&ArrayD<f32>> {
        self.map.get(rel).with_context(|| format!("tensor {}{rel} is missing", self.prefix))
    }

    pub fn vector(&self, rel: &str) -> Result<Array1<f32>> {
        let t = self.get(rel)?;
        t.clone()
            .into_dimensionality()
            .with_context(|| format!("tensor {}{rel} has shape {:?}, expected 1D", self.prefix, t.shape()))
    }

    pub fn matrix(&self, rel: &str) -> Result<Array2<f32>> {
        let t = self.get(rel)?;
        t.clone()
            .into_dimensionality()
            .with_context(|| format!("tensor {}{rel} has shape {:?}, expected 2D", self.prefix, t.shape()))
    }

    /// The linear `module` (`self_attn.q_proj`): its `.weight` and, if present, `.bias`.
    pub fn linear(&self, module: &str) -> Result<Linear> {
        let weight = self.matrix(&format!("{module}.weight"))?;
        let bias_name = format!("{module}.bias");
        let bias = if self.has(&bias_name) { Some(self.vector(&bias_name)?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// Replaces or adds a tensor (calibration folds smoothing scales in place).
    pub fn set(&mut self, rel: &str, value: ArrayD<f32>) {
        self.map.insert(rel.to_string(), value);
    }
}
