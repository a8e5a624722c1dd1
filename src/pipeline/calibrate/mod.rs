//! Layer-wise calibration: the transform stage of a calibrated run.
//!
//! The calibration samples flow through the model one unit at a time, only that unit's weights
//! resident. For each decoder layer:
//! 1. run the float layer on every sample, observing each linear's input (per-channel ranges,
//!    and the Hessian where GPTQ needs it);
//! 2. fold the recipe's smoothing into the weights (norm→linears, v→o, up→down), transforming
//!    the statistics exactly instead of observing again;
//! 3. if a static scheme measures its range with a histogram, run the smoothed layer once more
//!    to fill the histograms;
//! 4. quantize every linear (GPTQ or round-to-nearest; static activation ranges) and hand the
//!    tensors to the writer;
//! 5. run the layer as the quantized model computes it; its outputs are the next layer's inputs
//!    (errors propagate as at inference) and are saved as the unit's activation snapshot, so a
//!    resumed run continues from exactly here.

pub mod hooks;
pub mod smoothing;
#[cfg(test)]
mod smoothing_parity;

use super::activations::{snapshot_path, Snapshot, SnapshotWriter};
use super::data_free::run_job;
use super::forward::{DecoderInput, Injection};
use super::plan::{Job, UnitPlan};
use super::stages::UnitProcessor;
use crate::device::Device;
use crate::export::{Exporter, OutTensor, FLOAT};
use crate::io::checkpoint::Checkpoint;
use crate::model::layout::UnitKind;
use crate::model::rope::{Positions, Rope};
use crate::model::text::{embed, DecoderLayer, ForwardOptions};
use crate::model::weights::Weights;
use crate::model::{LogicalTensor, Model, Source};
use crate::quant::gptq::{self, GptqConfig, HessianFactor};
use crate::quant::observer::{Histogram, HISTOGRAM_BINS};
use crate::quant::smooth::{smooth_linear_linear, smooth_norm_linears, smooth_ov, Heads};
use crate::quant::spec::{ActMethod, WeightMethod};
use crate::quant::{act_range, rtn, ActQuant, QuantSpec, QuantizedLinear, Recipe};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use hooks::{dequantize_weight, ActSim, Observe, SimLinear, Simulate};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use smoothing::{input_group, text_layer_subgraphs, Kind, Smoothing, Subgraph};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One calibration sequence.
#[derive(Debug, Clone)]
pub struct CalibSample {
    pub ids: Vec<i64>,
}

/// The smoothing map applied to an input group: `x' = (x - shift) / scales`.
type InputMap = (Option<Vec<f32>>, Vec<f32>);

pub struct Calibrator<'a> {
    pub ckpt: &'a Checkpoint,
    pub model: &'a Model,
    pub recipe: &'a Recipe,
    pub exporter: &'a dyn Exporter,
    pub device: &'a dyn Device,
    pub smoothing: Option<Smoothing>,
    pub samples: Vec<CalibSample>,
    /// Where activation snapshots go.
    pub save: PathBuf,
    /// Bytes of activations that may stay in memory; beyond, they are read from the snapshot file.
    pub activation_budget: u64,
    /// Units the writer has journaled: snapshots older than the last of them are not needed.
    pub committed: Arc<AtomicUsize>,
    state: Option<Snapshot>,
    rope: Rope,
}

impl<'a> Calibrator<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ckpt: &'a Checkpoint,
        model: &'a Model,
        recipe: &'a Recipe,
        exporter: &'a dyn Exporter,
        device: &'a dyn Device,
        samples: Vec<CalibSample>,
        save: PathBuf,
        activation_budget: u64,
        committed: Arc<AtomicUsize>,
    ) -> Result<Calibrator<'a>> {
        Ok(Calibrator {
            ckpt,
            model,
            recipe,
            exporter,
            device,
            smoothing: Smoothing::from_recipe(recipe)?,
            samples,
            save,
            activation_budget,
            committed,
            state: None,
            rope: Rope::new(&model.text.rope, model.text.head_dim)?,
        })
    }

    /// Picks up the activations of the last unit finished before `start`.
    pub fn resume(&mut self, start: usize) -> Result<()> {
        let dir = self.save.join(super::activations::DIR);
        let mut best: Option<usize> = None;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(i) = name.strip_prefix("after-unit-").and_then(|r| r.strip_suffix(".bin")) {
                    if let Ok(i) = i.parse::<usize>() {
                        if i < start {
                            best = best.max(Some(i));
                        }
                    }
                }
            }
        }
        if let Some(i) = best {
            self.state = Some(Snapshot::open(&snapshot_path(&self.save, i))?);
        }
        Ok(())
    }

    fn sample(&self, s: usize) -> Result<DecoderInput> {
        let st = self.state.as_ref().context("calibration reached a decoder layer before the embeddings")?;
        let hidden = st.get(&format!("{s}.hidden"))?;
        let embeds = Array2::from_shape_vec((hidden.shape[0], hidden.shape[1]), hidden.to_f32()?)?;
        let pos = st.get(&format!("{s}.positions"))?;
        let positions = Positions::from_ids(Array2::from_shape_vec((pos.shape[0], pos.shape[1]), pos.to_i64()?)?)?;
        let mut injections = Vec::new();
        for layer in 0..self.model.text.num_layers {
            let rows = format!("{s}.inject.{layer}.rows");
            if st.contains(&rows) {
                let r = st.get(&rows)?.to_i64()?.into_iter().map(|v| v as usize).collect();
                let v = st.get(&format!("{s}.inject.{layer}.values"))?;
                let values = Array2::from_shape_vec((v.shape[0], v.shape[1]), v.to_f32()?)?;
                injections.push(Injection { after_layer: layer, rows: r, values });
            }
        }
        Ok(DecoderInput { embeds, positions, injections })
    }

    fn push_sample(w: &mut SnapshotWriter, s: usize, d: &DecoderInput) -> Result<()> {
        let (r, c) = d.embeds.dim();
        w.push(&format!("{s}.hidden"), Tensor::from_f32(&[r, c], d.embeds.as_standard_layout().as_slice().unwrap()))?;
        let ids = d.positions.ids();
        let p: Vec<i64> = ids.iter().copied().collect();
        w.push(&format!("{s}.positions"), Tensor::from_i64(&[ids.nrows(), ids.ncols()], &p))?;
        for j in &d.injections {
            let rows: Vec<i64> = j.rows.iter().map(|&x| x as i64).collect();
            w.push(&format!("{s}.inject.{}.rows", j.after_layer), Tensor::from_i64(&[rows.len()], &rows))?;
            let (r, c) = j.values.dim();
            let v: Vec<f32> = j.values.iter().copied().collect();
            w.push(&format!("{s}.inject.{}.values", j.after_layer), Tensor::from_f32(&[r, c], &v))?;
        }
        Ok(())
    }

    /// Writes sample outputs `f(0..n)` as unit `index`'s snapshot, makes it the state, and drops
    /// snapshots no resume can need any more.
    fn commit_state(&mut self, index: usize, f: impl FnMut(&Self, usize) -> Result<DecoderInput>) -> Result<()> {
        let snap = self.write_snapshot(index, f)?;
        self.state = Some(snap);
        let committed = self.committed.load(Ordering::SeqCst);
        if let Ok(rd) = std::fs::read_dir(self.save.join(super::activations::DIR)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let i = name
                    .strip_prefix("after-unit-")
                    .and_then(|r| r.split('.').next())
                    .and_then(|r| r.parse::<usize>().ok());
                // A resume starts at a unit >= `committed` and reads the newest snapshot before it.
                if i.is_some_and(|i| i != index && i + 1 < committed) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    fn write_snapshot(
        &self,
        index: usize,
        mut f: impl FnMut(&Self, usize) -> Result<DecoderInput>,
    ) -> Result<Snapshot> {
        let mut w = SnapshotWriter::create(&snapshot_path(&self.save, index), self.activation_budget)?;
        for s in 0..self.samples.len() {
            Calibrator::push_sample(&mut w, s, &f(self, s)?)?;
        }
        w.finish()
    }

    /// The token embeddings of every sample become the first state.
    fn embed_unit(
        &mut self,
        index: usize,
        up: &UnitPlan,
        emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>,
    ) -> Result<()> {
        let name = self.model.layout.embed_tokens();
        let t =
            up.unit.tensors.iter().find(|t| t.name() == name).with_context(|| format!("tensor {name} is missing"))?;
        let w = Weights::load_tensors(self.ckpt, std::iter::once(t), "")?;
        let table: Array2<f32> = w.matrix(&name)?;
        self.data_free(up, emit)?;
        self.commit_state(index, |this, s| {
            let ids = &this.samples[s].ids;
            let embeds = embed(table.view(), ids).with_context(|| format!("calibration sample {s}"))?;
            Ok(DecoderInput { embeds, positions: Positions::sequential(ids.len()), injections: vec![] })
        })
    }

    fn data_free(&self, up: &UnitPlan, emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>) -> Result<()> {
        for job in &up.jobs {
            if let Job::Quantize { module, spec, .. } = job {
                if spec.needs_calibration() {
                    bail!(
                        "{module}: calibrating {} is not supported (keep it float or use a data-free scheme)",
                        up.unit.name
                    );
                }
            }
            emit(run_job(self.ckpt, self.exporter, job)?)?;
        }
        Ok(())
    }

    fn text_layer(
        &mut self,
        index: usize,
        i: usize,
        up: &UnitPlan,
        emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>,
    ) -> Result<()> {
        let cfg = &self.model.text;
        let prefix = self.model.layout.unit_prefix(UnitKind::TextLayer(i));
        let mut w = Weights::load(self.ckpt, &up.unit, &prefix)?;
        let original_bias: BTreeSet<String> =
            w.map.keys().filter_map(|k| k.strip_suffix(".bias")).map(String::from).collect();
        let rel = |full: &str| full.strip_prefix(&prefix).unwrap_or(full).to_string();
        let full = |r: &str| format!("{prefix}{r}");
        let quantized: Vec<(String, QuantSpec)> = up
            .jobs
            .iter()
            .filter_map(|j| match j {
                Job::Quantize { module, spec, .. } => Some((rel(module), *spec)),
                Job::Keep(_) => None,
            })
            .collect();
        let subgraphs = match &self.smoothing {
            Some(s) => text_layer_subgraphs(s, cfg, i, self.recipe, &full, &|r| original_bias.contains(r)),
            None => Vec::new(),
        };
        let n = self.samples.len();
        let all_experts = ForwardOptions { moe_all_experts: true };

        // 1. Observe the float layer.
        let mut obs = Observe::default();
        obs.hessian_groups = quantized
            .iter()
            .filter(|(_, s)| s.weight_method == WeightMethod::Gptq)
            .map(|(m, _)| input_group(m))
            .collect();
        {
            let layer = DecoderLayer::from_weights(cfg, i, w.clone())?;
            for s in 0..n {
                let d = self.sample(s)?;
                let angles = self.rope.angles(&d.positions)?;
                obs.next_sequence();
                layer.forward(self.device, d.embeds.view(), &angles, &mut obs, all_experts)?;
            }
        }
        for (g, st) in &obs.stats {
            ensure!(st.nonfinite == 0, "{prefix}{g}: the calibration activations hold {} NaN/Inf values", st.nonfinite);
        }

        // 2. Smooth.
        let mut maps: BTreeMap<String, InputMap> = BTreeMap::new();
        let mut modified: BTreeSet<String> = BTreeSet::new();
        for sg in &subgraphs {
            let (shift, scales) = self
                .apply_smoothing(&mut w, sg, &obs, &mut modified)
                .with_context(|| format!("smoothing in {prefix}"))?;
            maps.insert(input_group(&sg.consumers[0]), (shift, scales));
        }
        let stats_of = |g: &str| -> Result<crate::quant::observer::ChannelStats> {
            let st = obs.stats.get(g).with_context(|| format!("{prefix}{g} saw no calibration input"))?;
            Ok(match maps.get(g) {
                Some((z, s)) => st.smoothed(z.as_deref(), s),
                None => st.clone(),
            })
        };
        // Float tensors the smoothing changed are stored in their dtype: compute with that.
        for name in &modified {
            if !quantized.iter().any(|(m, _)| name == &format!("{m}.weight")) {
                if let Some(t) = up.unit.tensors.iter().find(|t| t.name() == full(name)) {
                    let v = w.get(name)?;
                    let rounded = Tensor::from_f32_as(t.meta.dtype, v.shape(), &v.iter().copied().collect::<Vec<_>>())?;
                    w.set(name, ArrayD::from_shape_vec(IxDyn(v.shape()), rounded.to_f32()?)?);
                }
            }
        }

        // 3. Histograms, on the smoothed float layer.
        let hist_groups: BTreeSet<String> = quantized
            .iter()
            .filter(|(_, s)| matches!(s.act, ActQuant::PerTensorStatic { .. }) && s.act_method == ActMethod::Histogram)
            .map(|(m, _)| input_group(m))
            .collect();
        let mut histograms = BTreeMap::new();
        if !hist_groups.is_empty() {
            let mut hs = BTreeMap::new();
            for g in &hist_groups {
                let (lo, hi) = stats_of(g)?.tensor_range().unwrap_or((0.0, 0.0));
                hs.insert(g.clone(), Histogram::with_range(lo, hi, HISTOGRAM_BINS));
            }
            let mut obs2 = Observe::default();
            obs2.histograms = Some(hs);
            let layer = DecoderLayer::from_weights(cfg, i, w.clone())?;
            for s in 0..n {
                let d = self.sample(s)?;
                let angles = self.rope.angles(&d.positions)?;
                obs2.next_sequence();
                layer.forward(self.device, d.embeds.view(), &angles, &mut obs2, all_experts)?;
            }
            histograms = obs2.histograms.unwrap();
        }

        // 4. Quantize, and hand the tensors over.
        let mut factors: BTreeMap<String, HessianFactor> = BTreeMap::new();
        let mut sim = Simulate::default();
        for job in &up.jobs {
            let out = match job {
                Job::Keep(t) => vec![self.keep(t, &w, &prefix, &modified)?],
                Job::Quantize { module, spec, .. } => {
                    let m = rel(module);
                    let g = input_group(&m);
                    let linear = w.linear(&m)?;
                    let weight = match spec.weight_method {
                        WeightMethod::MinMax => {
                            let flat: Vec<f32> = linear.weight.iter().copied().collect();
                            rtn::quantize(&flat, linear.out_features(), linear.in_features(), spec)
                        }
                        WeightMethod::Gptq => {
                            if !factors.contains_key(&g) {
                                let h = obs
                                    .hessians
                                    .get(&g)
                                    .with_context(|| format!("{module}: no Hessian was gathered"))?;
                                let h = match maps.get(&g) {
                                    Some((z, s)) => h.smoothed(z.as_deref(), s),
                                    None => h.clone(),
                                };
                                factors
                                    .insert(g.clone(), HessianFactor::new(h.matrix().view(), &GptqConfig::default())?);
                            }
                            let (q, report) = gptq::quantize_with(
                                self.device,
                                linear.weight.view(),
                                &factors[&g],
                                spec,
                                &GptqConfig::default(),
                            )
                            .with_context(|| format!("GPTQ on {module}"))?;
                            if report.fell_back_to_rtn {
                                eprintln!(
                                    "warning: {module}: the Hessian could not be factored; rounded to nearest instead"
                                );
                            }
                            q
                        }
                    };
                    let input = match spec.act {
                        ActQuant::PerTensorStatic { symmetric } => Some(match spec.act_method {
                            ActMethod::MinMax => {
                                let (lo, hi) = stats_of(&g)?.tensor_range().unwrap_or((0.0, 0.0));
                                act_range::minmax_range(lo, hi, symmetric)
                            }
                            ActMethod::Histogram => act_range::histogram_range(&histograms[&g], symmetric),
                        }),
                        _ => None,
                    };
                    let act = match (spec.act, input) {
                        (ActQuant::PerTensorStatic { .. }, Some(r)) => ActSim::Static(r),
                        (ActQuant::PerToken, _) => ActSim::PerToken,
                        _ => ActSim::None,
                    };
                    let bias = linear.bias.clone();
                    sim.linears.insert(
                        m.clone(),
                        SimLinear {
                            linear: crate::model::nn::Linear { weight: dequantize_weight(&weight), bias: bias.clone() },
                            act,
                        },
                    );
                    let ql = QuantizedLinear {
                        spec: *spec,
                        weight,
                        bias: bias.map(|b| b.to_vec()),
                        write_bias: original_bias.contains(&m),
                        input,
                    };
                    self.exporter.linear_tensors(module, &ql)
                }
            };
            emit(out)?;
        }
        drop(factors);
        drop(obs);

        // 5. The quantized layer's outputs are the next layer's inputs.
        let layer = DecoderLayer::from_weights(cfg, i, w)?;
        self.commit_state(index, |this, s| {
            let mut d = this.sample(s)?;
            let angles = this.rope.angles(&d.positions)?;
            d.embeds = layer.forward(this.device, d.embeds.view(), &angles, &mut sim, ForwardOptions::default())?;
            let (now, later): (Vec<Injection>, Vec<Injection>) =
                d.injections.drain(..).partition(|j| j.after_layer == i);
            for j in &now {
                for (k, &t) in j.rows.iter().enumerate() {
                    let mut row = d.embeds.row_mut(t);
                    row += &j.values.row(k);
                }
            }
            d.injections = later;
            Ok(d)
        })
    }

    /// A float tensor: the checkpoint's bytes, or the smoothed values in the tensor's dtype.
    fn keep(&self, t: &LogicalTensor, w: &Weights, prefix: &str, modified: &BTreeSet<String>) -> Result<OutTensor> {
        let r = t.name().strip_prefix(prefix).unwrap_or(t.name());
        if modified.contains(r) || matches!(t.source, Source::Computed(_)) {
            let v = w.get(r)?;
            let tensor = Tensor::from_f32_as(t.meta.dtype, &t.meta.shape, &v.iter().copied().collect::<Vec<_>>())?;
            return Ok(OutTensor { name: t.name().to_string(), tensor, kind: FLOAT });
        }
        let mut out = run_job(self.ckpt, self.exporter, &Job::Keep(t.clone()))?;
        Ok(out.remove(0))
    }

    /// Folds one subgraph's smoothing into `w`; returns the map its consumers' input went through.
    fn apply_smoothing(
        &self,
        w: &mut Weights,
        sg: &Subgraph,
        obs: &Observe,
        modified: &mut BTreeSet<String>,
    ) -> Result<InputMap> {
        let s = self.smoothing.as_ref().unwrap();
        let mut cfg = s.cfg;
        cfg.shift = sg.shift;
        let group = input_group(&sg.consumers[0]);
        let stats = obs.stats.get(&group).with_context(|| format!("{group} saw no calibration input"))?;
        let mut linears: Vec<crate::model::nn::Linear> =
            sg.consumers.iter().map(|c| w.linear(c)).collect::<Result<_>>()?;
        let report = match &sg.kind {
            Kind::NormLinear { norm } => {
                let mut g: Array1<f32> = w.vector(&format!("{norm}.weight"))?;
                let bias_name = format!("{norm}.bias");
                let mut b = if w.has(&bias_name) { Some(w.vector(&bias_name)?) } else { None };
                let mut refs: Vec<&mut crate::model::nn::Linear> = linears.iter_mut().collect();
                let rep = smooth_norm_linears(&mut g, &mut b, &mut refs, stats, &cfg)?;
                w.set(&format!("{norm}.weight"), g.into_dyn());
                modified.insert(format!("{norm}.weight"));
                if let Some(b) = b {
                    w.set(&bias_name, b.into_dyn());
                    modified.insert(bias_name);
                }
                rep
            }
            Kind::Ov { producer } | Kind::UpDown { producer } => {
                let mut p = w.linear(producer)?;
                let rep = if matches!(sg.kind, Kind::Ov { .. }) {
                    let heads =
                        Heads { num_heads: self.model.text.num_heads, num_kv_heads: self.model.text.num_kv_heads };
                    smooth_ov(&mut p, &mut linears[0], stats, heads, &cfg)?
                } else {
                    smooth_linear_linear(&mut p, &mut linears[0], stats, &cfg)?
                };
                put_linear(w, producer, p, modified);
                rep
            }
        };
        for (c, l) in sg.consumers.iter().zip(linears) {
            put_linear(w, c, l, modified);
        }
        Ok((report.shift, report.scales))
    }
}

fn put_linear(w: &mut Weights, module: &str, l: crate::model::nn::Linear, modified: &mut BTreeSet<String>) {
    w.set(&format!("{module}.weight"), l.weight.into_dyn());
    modified.insert(format!("{module}.weight"));
    if let Some(b) = l.bias {
        w.set(&format!("{module}.bias"), b.into_dyn());
        modified.insert(format!("{module}.bias"));
    }
}

impl UnitProcessor for Calibrator<'_> {
    fn process(
        &mut self,
        index: usize,
        up: &UnitPlan,
        emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>,
    ) -> Result<()> {
        match up.unit.kind {
            UnitKind::Embed => self.embed_unit(index, up, emit),
            UnitKind::TextLayer(i) => self.text_layer(index, i, up, emit),
            _ => self.data_free(up, emit),
        }?;
        for t in &up.unit.tensors {
            super::load::release(self.ckpt, t);
        }
        Ok(())
    }
}

/// The tensors smoothing adds to a decoder layer (a norm's bias when a shift is folded into a
/// norm that had none), as the plan must list them.
pub fn planned_additions(model: &Model, recipe: &Recipe, unit: &crate::model::Unit) -> Result<Vec<LogicalTensor>> {
    let (UnitKind::TextLayer(i), Some(s)) = (unit.kind, Smoothing::from_recipe(recipe)?) else { return Ok(Vec::new()) };
    let prefix = model.layout.unit_prefix(unit.kind);
    let names: BTreeSet<&str> = unit.tensors.iter().map(|t| t.name()).collect();
    let full = |r: &str| format!("{prefix}{r}");
    let has_bias = |r: &str| names.contains(format!("{prefix}{r}.bias").as_str());
    let mut out = Vec::new();
    for sg in text_layer_subgraphs(&s, &model.text, i, recipe, &full, &has_bias) {
        if let (Kind::NormLinear { norm }, true) = (&sg.kind, sg.shift) {
            let bias = full(&format!("{norm}.bias"));
            if !names.contains(bias.as_str()) {
                let weight = unit.tensors.iter().find(|t| t.name() == full(&format!("{norm}.weight")));
                let w = weight.with_context(|| format!("{} has no {norm}.weight", unit.name))?;
                out.push(LogicalTensor {
                    meta: crate::tensor::TensorMeta::new(bias.clone(), w.meta.dtype, &w.meta.shape),
                    source: Source::Computed(bias),
                });
            }
        }
    }
    Ok(out)
}
