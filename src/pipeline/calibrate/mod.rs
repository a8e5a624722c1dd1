//! Layer-wise calibration: the transform stage of a calibrated run.
//!
//! The calibration samples flow through the model one unit at a time, only that unit's weights
//! resident. Vision-language samples first go through the vision tower, block by block (its
//! linears calibrated on the image activations the same way, without smoothing); the embeddings
//! unit splices the image features into the token embeddings. For each decoder layer:
//! 0. fold the recipe's QuaRot rotation into the weights ([`quarot`]; the embeddings, the head and
//!    the vision mergers feeding the text stream are rotated in their own units);
//! 1. run the float layer on every sample, observing each linear's input (per-channel ranges and
//!    magnitudes, and the Hessian where GPTQ or AWQ needs it);
//! 2. fold the recipe's smoothing into the weights (norm→linears, v→o, up→down) — SmoothQuant's,
//!    m2's and iter_smooth's formula, or AWQ's searched scales followed by its clip search —
//!    transforming the statistics exactly instead of observing again;
//! 3. if a static scheme measures its range with a histogram, run the smoothed layer once more
//!    to fill the histograms;
//! 4. quantize every linear (GPTQ or round-to-nearest; static activation ranges) and hand the
//!    tensors to the writer. With GPTQ's `true_sequential`, the layer's linears are quantized in
//!    stages (q/k/v, then o, then gate/up, then down, as the layer graph orders them), each
//!    stage's Hessians gathered by a pass that computes the earlier stages as quantized;
//! 5. with a KV-cache step, run the quantized layer once more and take the per-channel ranges of
//!    what its attention caches (keys after their norm and RoPE, values): the C8 scales;
//! 6. run the layer as the quantized model computes it (its KV cache rounded to C8 too); its
//!    outputs are the next layer's inputs (errors propagate as at inference) and are saved as the
//!    unit's activation snapshot, so a resumed run continues from exactly here.

pub mod experts;
pub mod hooks;
pub mod quarot;
pub mod smoothing;
#[cfg(test)]
mod smoothing_parity;

use super::activations::{snapshot_path, Snapshot, SnapshotWriter};
use super::data_free::run_job;
use super::forward::{self, text_only, with_image_features, DecoderInput, Injection};
use super::plan::{Job, UnitPlan};
use super::stages::{Emit, UnitProcessor};
use crate::device::Device;
use crate::export::{Exporter, OutTensor, FLOAT};
use crate::io::checkpoint::Checkpoint;
use crate::model::decoder::{self, embed, Carry, ForwardOptions, InputGroups, LayerGraph};
use crate::model::layout::UnitKind;
use crate::model::rope::Positions;
use crate::model::vision::{self, VisionInput, VisionOutput, VisionState, VisionTower};
use crate::model::weights::Weights;
use crate::model::{LogicalTensor, Model, Source};
use crate::quant::awq::{self, Consumer};
use crate::quant::gptq::{self, GptqConfig, HessianFactor};
use crate::quant::observer::{Histogram, HISTOGRAM_BINS};
use crate::quant::recipe::KvCacheSpec;
use crate::quant::rotation::{fuse_norm, rotate_input, rotate_rows};
use crate::quant::smooth::{self, consumer_map, fold_linear_linear, fold_norm_linears, fold_ov, ConsumerMap, Heads};
use crate::quant::spec::{ActMethod, WeightMethod};
use crate::quant::{act_range, rtn, ActQuant, QuantSpec, QuantizedLinear, Recipe};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, ensure, Context, Result};
use hooks::{dequantize_weight, ActSim, Observe, SimLinear, Simulate};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use quarot::Rotations;
use smoothing::{layer_subgraphs, Algorithms, Kind, Smoothing, Subgraph};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One calibration sequence, and the image its image tokens stand for.
#[derive(Debug, Clone)]
pub struct CalibSample {
    pub ids: Vec<i64>,
    pub image: Option<VisionInput>,
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
    /// The recipe's QuaRot rotations, built once from their seed.
    pub rotations: Option<Rotations>,
    pub samples: Vec<CalibSample>,
    /// Where activation snapshots go.
    pub save: PathBuf,
    /// Bytes of activations that may stay in memory; beyond, they are read from the snapshot file.
    pub activation_budget: u64,
    /// Units the writer has journaled: snapshots older than the last of them are not needed.
    pub committed: Arc<AtomicUsize>,
    state: Option<Snapshot>,
    /// The vision tower, when some sample has an image.
    tower: Option<VisionTower>,
    /// Each sample's vision activations while the tower's blocks are calibrated.
    vision: Vec<Option<VisionState>>,
    /// Each sample's image features once the tower is done, until the embeddings unit uses them.
    features: Vec<Option<VisionOutput>>,
}

/// What the Hessians of the samples observed side by side may hold at once beside the plan's
/// memory (each sample's observer gathers its own until it is merged).
const FORKED_HESSIAN_BYTES: u64 = 512 << 20;

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
        let tower = match samples.iter().any(|s| s.image.is_some()) {
            true => Some(VisionTower::from_model(model)?),
            false => None,
        };
        let algorithms = Algorithms::from_recipe(recipe)?;
        let rotations = algorithms.quarot.as_ref().map(|q| q.rotations(model)).transpose()?;
        if let Some(r) = &rotations {
            eprintln!("quarot: {}", r.describe());
        }
        Ok(Calibrator {
            ckpt,
            model,
            recipe,
            exporter,
            device,
            smoothing: algorithms.smoothing,
            rotations,
            samples,
            save,
            activation_budget,
            committed,
            state: None,
            tower,
            vision: Vec::new(),
            features: Vec::new(),
        })
    }

    /// Picks up the activations of the last unit finished before `start`. The vision tower's
    /// activations are not snapshotted (a tower is small next to the decoder): a run that stopped
    /// inside the tower replays the tower's finished units, writing nothing, which gives the
    /// same activations.
    pub fn resume(&mut self, units: &[UnitPlan], start: usize) -> Result<()> {
        let embeddings = units.iter().position(|u| u.unit.kind == UnitKind::Embed);
        if self.tower.is_some() && embeddings.is_some_and(|e| start <= e) {
            for (index, up) in units[..start].iter().enumerate() {
                if is_vision(up.unit.kind) {
                    self.process(index, up, &mut |_| Ok(()))?;
                }
            }
        }
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
        let mut carry = Carry::default();
        let carried = format!("{s}.carry.");
        for name in st.names().iter().filter(|n| n.starts_with(&carried)) {
            let t = st.get(name)?;
            carry.insert(&name[carried.len()..], Array2::from_shape_vec((t.shape[0], t.shape[1]), t.to_f32()?)?);
        }
        Ok(DecoderInput { embeds, positions, injections, carry })
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
        for (name, a) in d.carry.iter() {
            let v: Vec<f32> = a.iter().copied().collect();
            w.push(&format!("{s}.carry.{name}"), Tensor::from_f32(&[a.nrows(), a.ncols()], &v))?;
        }
        Ok(())
    }

    /// Runs `work` on every calibration sample and hands the results to `sink` in sample order.
    /// The samples run side by side, one per compute thread, each computing its products on its
    /// own thread ([`Device::serial`]): calibration's products (a sample's few hundred tokens
    /// through a layer) are too small to split across threads efficiently, and everything
    /// between them (norms, softmax, observers, the simulated rounding) runs in parallel too. A
    /// wave of one sample (one thread, or the last of an odd count) uses the device's parallel
    /// products instead. What a sample computes does not depend on the thread count, and the
    /// results arrive in sample order, so a run is reproducible (and resumes to the same bytes)
    /// whatever `--threads` is.
    fn each_sample<T: Send>(
        &self,
        work: impl Fn(usize, &dyn Device) -> Result<T> + Sync,
        sink: impl FnMut(usize, T) -> Result<()>,
    ) -> Result<()> {
        self.samples_in_waves(0..self.samples.len(), crate::device::threads(), &work, sink)
    }

    /// [`Calibrator::each_sample`] for the samples `range`, at most `wave` side by side.
    fn samples_in_waves<T: Send>(
        &self,
        range: std::ops::Range<usize>,
        wave: usize,
        work: &(impl Fn(usize, &dyn Device) -> Result<T> + Sync),
        mut sink: impl FnMut(usize, T) -> Result<()>,
    ) -> Result<()> {
        use rayon::prelude::*;
        let wave = wave.max(1);
        for first in range.clone().step_by(wave) {
            let last = (first + wave).min(range.end);
            let results: Vec<Result<T>> = if last - first == 1 {
                vec![work(first, self.device)]
            } else {
                let device = self.device.serial();
                (first..last).into_par_iter().map(|s| work(s, device)).collect()
            };
            for (s, r) in (first..last).zip(results) {
                sink(s, r?)?;
            }
        }
        Ok(())
    }

    /// Writes sample outputs `f(0..n)` as unit `index`'s snapshot, makes it the state, and drops
    /// snapshots no resume can need any more. The samples are computed side by side
    /// ([`Calibrator::each_sample`]).
    fn commit_state(
        &mut self,
        index: usize,
        f: impl Fn(&Self, &dyn Device, usize) -> Result<DecoderInput> + Sync,
    ) -> Result<()> {
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
        f: impl Fn(&Self, &dyn Device, usize) -> Result<DecoderInput> + Sync,
    ) -> Result<Snapshot> {
        let mut w = SnapshotWriter::create(&snapshot_path(&self.save, index), self.activation_budget)?;
        self.each_sample(|s, device| f(self, device, s), |s, d| Calibrator::push_sample(&mut w, s, &d))?;
        w.finish()
    }

    /// The token embeddings of every sample become the first state.
    fn embed_unit(&mut self, index: usize, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        let name = self.model.layout.embed_tokens();
        let t =
            up.unit.tensors.iter().find(|t| t.name() == name).with_context(|| format!("tensor {name} is missing"))?;
        let mut w = Weights::load_tensors(self.ckpt, std::iter::once(t), "")?;
        let mut table: Array2<f32> = w.matrix(&name)?;
        match &self.rotations {
            None => self.data_free(up, emit)?,
            Some(r) => {
                // The stream starts rotated; compute with the table as it is stored.
                rotate_rows(&mut table, &r.residual)?;
                let stored =
                    Tensor::from_f32_as(t.meta.dtype, &t.meta.shape, table.as_slice().expect("standard layout"))?;
                table = Array2::from_shape_vec(table.dim(), stored.to_f32()?)?;
                w.set(&name, table.clone().into_dyn());
                let modified = BTreeSet::from([name.clone()]);
                for job in &up.jobs {
                    match job {
                        Job::Keep(t) => self.keep(t, &w, "", &modified, emit)?,
                        Job::Quantize { module, .. } => bail!("{module}: quantizing the embeddings is not supported"),
                        Job::KvCache { module, .. } => bail!("{module}: the embeddings have no KV cache"),
                    }
                }
            }
        }
        let rope_index = forward::rope_index(self.model, self.features.iter().any(Option::is_some))?;
        self.commit_state(index, |this, _, s| {
            let sample = &this.samples[s];
            let context = || format!("calibration sample {s}");
            let embeds = embed(table.view(), &sample.ids).with_context(context)?;
            match (this.features.get(s).and_then(Option::as_ref), &sample.image) {
                (Some(f), Some(image)) => {
                    with_image_features(this.model, rope_index.as_ref(), &sample.ids, embeds, f, &image.image_grid_thw)
                }
                _ => text_only(this.model, &sample.ids, embeds),
            }
            .with_context(context)
        })?;
        self.features = Vec::new();
        Ok(())
    }

    /// A unit of the vision tower: the patch embeddings start every image's activations; each
    /// block (and the mergers / projector) is calibrated on them like a decoder layer, without
    /// smoothing, then computed as quantized to give the next unit's input.
    fn vision_unit(&mut self, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        let kind = up.unit.kind;
        // The mergers' outputs join the text stream: rotate them with it.
        let rotate = |w: &mut Weights| -> Result<BTreeSet<String>> {
            match (&self.rotations, kind) {
                (Some(r), UnitKind::VisionPost) => quarot::rotate_vision_outputs(w, &self.model.layout, r),
                _ => Ok(BTreeSet::new()),
            }
        };
        let Some(tower) = self.tower.clone() else {
            // No sample has an image: the tower sees no data, and only data-free schemes can go.
            if let Some(module) = needs_data(up) {
                bail!(
                    "{module}: the recipe calibrates the vision tower but no calibration sample has an image; \
                     give --calib_data a folder of images or a listing with \"image\" entries"
                );
            }
            if self.rotations.is_some() && kind == UnitKind::VisionPost {
                let mut w = vision::load_unit(self.ckpt, &self.model.layout, &up.unit)?;
                let modified = rotate(&mut w)?;
                return self.write_from_weights(up, &w, &modified, emit);
            }
            return self.data_free(up, emit);
        };
        let mut w = vision::load_unit(self.ckpt, &self.model.layout, &up.unit)?;
        let rotated = rotate(&mut w)?;
        let device = self.device;
        if kind == UnitKind::VisionPre {
            self.data_free(up, emit)?;
            self.vision = self
                .samples
                .iter()
                .enumerate()
                .map(|(s, x)| {
                    x.image
                        .as_ref()
                        .map(|img| tower.embed(device, &w, img))
                        .transpose()
                        .with_context(|| format!("calibration sample {s}"))
                })
                .collect::<Result<_>>()?;
            return Ok(());
        }
        let pass = |this: &Self, w: &Weights, obs: &mut Observe| -> Result<()> {
            for st in this.vision.iter().flatten() {
                obs.next_sequence();
                match kind {
                    UnitKind::VisionBlock(i) => tower.block(device, i, w, &mut st.clone(), obs)?,
                    _ => drop(tower.finish(device, w, st.clone(), obs)?),
                }
            }
            Ok(())
        };
        let mut sim =
            self.calibrate_linears(up, &mut w, &[], &InputGroups::default(), None, rotated, &pass, None, emit)?;
        match kind {
            UnitKind::VisionBlock(i) => {
                for st in self.vision.iter_mut().flatten() {
                    tower.block(device, i, &w, st, &mut sim)?;
                }
            }
            _ => {
                self.features = std::mem::take(&mut self.vision)
                    .into_iter()
                    .map(|st| st.map(|st| tower.finish(device, &w, st, &mut sim)).transpose())
                    .collect::<Result<_>>()?;
            }
        }
        Ok(())
    }

    /// Writes a unit from weights transformed in memory (`modified` names the changed tensors,
    /// relative to `w.prefix`) without calibration data: float tensors in their stored dtype,
    /// quantized linears rounded to nearest.
    fn write_from_weights(
        &self,
        up: &UnitPlan,
        w: &Weights,
        modified: &BTreeSet<String>,
        emit: &mut Emit,
    ) -> Result<()> {
        if let Some(module) = needs_data(up) {
            bail!("{module}: calibrating {} is not supported (keep it float or use a data-free scheme)", up.unit.name);
        }
        let prefix = &w.prefix;
        for job in &up.jobs {
            let out = match job {
                Job::Keep(t) => {
                    self.keep(t, w, prefix, modified, emit)?;
                    continue;
                }
                Job::KvCache { module, .. } => {
                    bail!("{module}: a KV cache of {} cannot be calibrated (only decoder layers')", up.unit.name)
                }
                Job::Quantize { module, spec, bias, .. } => {
                    let rel = module.strip_prefix(prefix.as_str()).unwrap_or(module);
                    let linear = w.linear(rel)?;
                    let flat: Vec<f32> = linear.weight.iter().copied().collect();
                    let weight = rtn::quantize(&flat, linear.out_features(), linear.in_features(), spec);
                    let ql = QuantizedLinear {
                        spec: *spec,
                        weight,
                        bias: linear.bias.map(|b| b.to_vec()),
                        write_bias: bias.is_some(),
                        input: None,
                    };
                    self.exporter.linear_tensors(module, &ql)
                }
            };
            emit(out.into())?;
        }
        Ok(())
    }

    /// The final norm and the output projection: with QuaRot, the norm is folded into `lm_head`
    /// and `lm_head` reads the rotated stream; tied embeddings are untied (`lm_head.weight` is a
    /// tensor the plan added).
    fn head_unit(&self, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        let Some(r) = &self.rotations else { return self.data_free(up, emit) };
        let layout = &self.model.layout;
        let mut w = Weights::load(self.ckpt, &up.unit, "")?;
        let (norm_name, head_name) = (layout.final_norm(), layout.lm_head_weight());
        if !w.has(&head_name) {
            let embed = layout.embed_tokens();
            let (shape, table) = self.ckpt.read_f32(&embed)?;
            w.set(&head_name, ArrayD::from_shape_vec(IxDyn(&shape), table)?);
        }
        let mut g: Array1<f32> = w.vector(&norm_name)?;
        let mut lm_head = w.linear(&layout.lm_head)?;
        fuse_norm(&mut g, &mut None, &mut [&mut lm_head])?;
        rotate_input(&mut lm_head, &r.residual).with_context(|| format!("quarot: {}", layout.lm_head))?;
        w.set(&norm_name, g.into_dyn());
        w.set(&head_name, lm_head.weight.into_dyn());
        let modified = BTreeSet::from([norm_name, head_name]);
        self.write_from_weights(up, &w, &modified, emit)
    }

    fn data_free(&self, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        if let Some(module) = needs_data(up) {
            bail!("{module}: calibrating {} is not supported (keep it float or use a data-free scheme)", up.unit.name);
        }
        for job in &up.jobs {
            run_job(self.ckpt, self.exporter, job, emit)?;
        }
        Ok(())
    }

    fn text_layer(&mut self, index: usize, i: usize, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        let model = self.model;
        let prefix = model.layout.unit_prefix(UnitKind::TextLayer(i));
        let full = |r: &str| format!("{prefix}{r}");
        let stored_bias: BTreeSet<String> = up
            .unit
            .tensors
            .iter()
            .filter_map(|t| t.name().strip_prefix(&prefix).and_then(|r| r.strip_suffix(".bias")).map(String::from))
            .collect();
        let graph = decoder::graph(model, i);
        let subgraphs = match &self.smoothing {
            Some(s) => layer_subgraphs(s, &graph, self.recipe, &full, &|r| stored_bias.contains(r)),
            None => Vec::new(),
        };
        // A MoE layer's experts stream in groups where they can; the rest of the layer is held.
        let awq = self.smoothing.as_ref().is_some_and(|s| s.awq.is_some());
        let mut streamed = match self.rotations.is_some() || awq {
            true => None,
            false => experts::streamed(model, i, up, &prefix, &subgraphs),
        };
        let resident = up.unit.tensors.iter().filter(|t| streamed.as_ref().is_none_or(|s| !s.holds(t)));
        let mut w = Weights::load_tensors(self.ckpt, resident, &prefix)?;
        let rotated = match &self.rotations {
            Some(r) => quarot::rotate_layer(&mut w, &graph, r, model.text.num_heads, model.text.num_kv_heads)?,
            None => BTreeSet::new(),
        };
        let pass = |this: &Self, w: &Weights, obs: &mut Observe| -> Result<()> {
            let layer = decoder::layer(model, i, w.clone())?;
            let template = obs.fork();
            let observe = |s: usize, device: &dyn Device| -> Result<Observe> {
                let mut d = this.sample(s)?;
                let mut o = template.fork();
                let opts = ForwardOptions { moe_all_experts: true };
                layer.forward(device, d.embeds.view(), &d.positions, &mut d.carry, &mut o, opts)?;
                Ok(o)
            };
            // Every sample side by side holds its own Hessians (a dense model's down_proj alone is
            // intermediate² floats): the first sample shows their size, and the rest run only as
            // many side by side as FORKED_HESSIAN_BYTES holds (one at a time, parallel products,
            // for the widest layers). The results are the same either way.
            let n = this.samples.len();
            this.samples_in_waves(0..n.min(1), 1, &observe, |_, o| {
                obs.merge(o);
                Ok(())
            })?;
            let bytes = obs.hessian_bytes().max(1);
            let wave = crate::device::threads().min((FORKED_HESSIAN_BYTES / bytes).max(1) as usize);
            this.samples_in_waves(n.min(1)..n, wave, &observe, |_, o| {
                obs.merge(o);
                Ok(())
            })
        };
        let groups = graph.input_groups();
        let mut sim = self.calibrate_linears(
            up,
            &mut w,
            &subgraphs,
            &groups,
            Some(&graph),
            rotated,
            &pass,
            streamed.as_mut(),
            emit,
        )?;

        // The quantized layer's outputs are the next layer's inputs.
        let timer = PhaseTimer::new(&up.unit.name);
        let layer = decoder::layer(model, i, w)?;
        self.calibrate_kv_caches(up, &prefix, layer.as_ref(), &mut sim, emit)?;
        let finish = move |mut d: DecoderInput| {
            let (now, later): (Vec<Injection>, Vec<Injection>) =
                d.injections.drain(..).partition(|j| j.after_layer == i);
            now.iter().for_each(|j| j.apply(&mut d.embeds));
            d.injections = later;
            d
        };
        let Some(streamed) = streamed else {
            let sim = &sim;
            self.commit_state(index, |this, device, s| {
                let mut d = this.sample(s)?;
                let opts = ForwardOptions::default();
                d.embeds = layer.forward(device, d.embeds.view(), &d.positions, &mut d.carry, &mut &*sim, opts)?;
                Ok(finish(d))
            })?;
            timer.lap("quantized pass");
            return Ok(());
        };
        // Every sample up to the experts, then the experts group by group over all of them.
        let mut rec = experts::Recorder { sim: &mut sim, pending: Vec::new() };
        let mut partial = Vec::with_capacity(self.samples.len());
        for s in 0..self.samples.len() {
            let mut d = self.sample(s)?;
            let opts = ForwardOptions::default();
            d.embeds = layer.forward(self.device, d.embeds.view(), &d.positions, &mut d.carry, &mut rec, opts)?;
            ensure!(rec.pending.len() == s + 1, "layer {i} did not reach its experts on sample {s}");
            partial.push(Some(d));
        }
        drop(layer);
        let pending = rec.pending;
        let mut sums: Vec<Array2<f32>> = pending.iter().map(|(x, _)| Array2::zeros(x.raw_dim())).collect();
        streamed.run(self.ckpt, self.exporter, self.device, &pending, &mut sums, &mut |ts| emit(ts.into()))?;
        drop(pending);
        let partial: Vec<std::sync::Mutex<Option<DecoderInput>>> = partial.into_iter().map(Into::into).collect();
        self.commit_state(index, |_, _, s| {
            let taken = partial[s].lock().map_err(|_| anyhow::anyhow!("a sample's state was poisoned"))?.take();
            let mut d = taken.context("a sample was finished twice")?;
            d.embeds += &sums[s];
            Ok(finish(d))
        })?;
        timer.lap("quantized pass (experts streamed)");
        Ok(())
    }

    /// The C8 KV caches of a decoder layer (its `KvCache` jobs): run the layer as quantized (`sim`: its
    /// linears quantized, so the keys and values are those the served model caches) over every sample,
    /// take each cached channel's range, hand the scales and offsets to `emit`, and make `sim` round the
    /// caches from then on (the next layer's inputs see the quantized cache).
    fn calibrate_kv_caches(
        &self,
        up: &UnitPlan,
        prefix: &str,
        layer: &dyn decoder::DecoderBlock,
        sim: &mut Simulate,
        emit: &mut Emit,
    ) -> Result<()> {
        let jobs: Vec<(&String, &KvCacheSpec)> = up
            .jobs
            .iter()
            .filter_map(|j| if let Job::KvCache { module, spec, .. } = j { Some((module, spec)) } else { None })
            .collect();
        if jobs.is_empty() {
            return Ok(());
        }
        sim.kv_stats = Some(BTreeMap::new());
        for s in 0..self.samples.len() {
            let mut d = self.sample(s)?;
            // Nothing after the attention matters here: streamed experts are skipped, not computed.
            let mut rec = experts::Recorder { sim: &mut *sim, pending: Vec::new() };
            let opts = ForwardOptions::default();
            layer.forward(self.device, d.embeds.view(), &d.positions, &mut d.carry, &mut rec, opts)?;
        }
        let stats = sim.kv_stats.take().unwrap_or_default();
        for (module, spec) in jobs {
            let rel = module.strip_prefix(prefix).unwrap_or(module);
            let st = stats.get(rel).with_context(|| format!("{module}: the layer cached no keys and values"))?;
            let bad = st.k.nonfinite + st.v.nonfinite;
            ensure!(bad == 0, "{module}: the cached keys and values hold {bad} NaN/Inf values");
            let q = st.quantizer(spec.symmetric);
            emit(self.exporter.kv_cache_tensors(module, &q).into())?;
            sim.kv.insert(rel.to_string(), q);
        }
        Ok(())
    }

    /// Steps 1–4 for one unit whose weights are `w`: observe the float unit (`pass` runs it over
    /// every sample through the hook it is given), fold the smoothing `subgraphs` into `w`, fill
    /// histograms, quantize every linear and hand each job's tensors to `emit`. Returns the hook
    /// that computes the unit as the quantized model will. `groups` says which linears read the
    /// same input, `graph` (decoder layers) how they connect; `modified` names the tensors of `w`
    /// already changed (by QuaRot).
    #[allow(clippy::too_many_arguments)]
    fn calibrate_linears(
        &self,
        up: &UnitPlan,
        w: &mut Weights,
        subgraphs: &[Subgraph],
        groups: &InputGroups,
        graph: Option<&LayerGraph>,
        mut modified: BTreeSet<String>,
        pass: &dyn Fn(&Self, &Weights, &mut Observe) -> Result<()>,
        mut streamed: Option<&mut experts::StreamedExperts>,
        emit: &mut Emit,
    ) -> Result<Simulate> {
        let prefix = w.prefix.clone();
        let original_bias = bias_modules(w);
        let rel = |full: &str| full.strip_prefix(&prefix).unwrap_or(full).to_string();
        let full = |r: &str| format!("{prefix}{r}");
        let all: Vec<(String, QuantSpec)> = up
            .jobs
            .iter()
            .filter_map(|j| match j {
                Job::Quantize { module, spec, .. } => Some((rel(module), *spec)),
                Job::Keep(_) | Job::KvCache { .. } => None,
            })
            .collect();
        let awq = self.smoothing.as_ref().and_then(|s| s.awq.as_ref()).filter(|_| !subgraphs.is_empty());
        // Streamed experts are quantized group by group after this ([`experts::StreamedExperts::run`]).
        let (away, quantized): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|(m, _)| streamed.as_ref().is_some_and(|s| s.is_streamed(m)));
        let away: BTreeSet<String> = away.into_iter().map(|(m, _)| m).collect();
        let is_streamed = |m: &str| away.contains(m);

        // With GPTQ's true-sequential, every stage's Hessians come from a pass of their own (step 4).
        let sequential = quantized.iter().any(|(_, s)| s.weight_method == WeightMethod::Gptq && s.true_sequential);
        let timer = PhaseTimer::new(&up.unit.name);

        // 1. Observe the float unit.
        let mut obs = Observe::new(groups.clone());
        if !sequential {
            obs.hessian_groups = quantized
                .iter()
                .filter(|(_, s)| s.weight_method == WeightMethod::Gptq)
                .map(|(m, _)| groups.of(m))
                .collect();
        }
        if awq.is_some() {
            obs.hessian_groups.extend(subgraphs.iter().map(|sg| groups.of(&sg.consumers[0])));
        }
        // Nothing is read of this pass but what its linears see: once a sample has reached every
        // input the quantization and the smoothing need, the rest of its forward (a decoder
        // layer's down_proj) is not computed.
        let needed = quantized.iter().map(|(m, _)| groups.of(m));
        obs.stop_after = Some(needed.chain(subgraphs.iter().map(|sg| groups.of(&sg.consumers[0]))).collect());
        pass(self, w, &mut obs)?;
        timer.lap("float pass");
        for (g, st) in &obs.stats {
            ensure!(st.nonfinite == 0, "{prefix}{g}: the calibration activations hold {} NaN/Inf values", st.nonfinite);
        }

        // 2. Smooth (or AWQ: search the scales, fold them, then search the clip ranges).
        let stored_dtype = |r: &str| up.unit.tensors.iter().find(|t| t.name() == full(r)).map(|t| t.meta.dtype);
        let mut maps: BTreeMap<String, InputMap> = BTreeMap::new();
        for sg in subgraphs {
            let (shift, scales) = self
                .apply_smoothing(w, sg, &obs, groups, &mut modified, &stored_dtype, streamed.as_deref_mut())
                .with_context(|| format!("smoothing in {prefix}"))?;
            maps.insert(groups.of(&sg.consumers[0]), (shift, scales));
        }
        timer.lap("smoothing");
        let hessian_of = |g: &str| -> Result<Array2<f32>> {
            let h = obs.hessians.get(g).with_context(|| format!("{prefix}{g}: no Hessian was gathered"))?;
            Ok(match maps.get(g) {
                Some((z, s)) => h.smoothed(z.as_deref(), s).matrix(),
                None => h.matrix(),
            })
        };
        if let Some(a) = awq {
            let consumers: BTreeSet<&String> = subgraphs.iter().flat_map(|sg| sg.consumers.iter()).collect();
            for (m, spec) in quantized.iter().filter(|(m, _)| consumers.contains(m) && a.clips(&full(m))) {
                let mut l = w.linear(m)?;
                let h = hessian_of(&groups.of(m))?;
                awq::search_clip(&mut l.weight, spec, h.view(), &a.cfg)
                    .with_context(|| format!("AWQ clip on {prefix}{m}"))?;
                put_linear(w, m, l, &mut modified);
            }
        }
        let stats_of = |g: &str| -> Result<crate::quant::observer::ChannelStats> {
            let st = obs.stats.get(g).with_context(|| format!("{prefix}{g} saw no calibration input"))?;
            Ok(match maps.get(g) {
                Some((z, s)) => st.smoothed(z.as_deref(), s),
                None => st.clone(),
            })
        };
        // Float tensors the transforms changed are stored in their dtype: compute with that. (A
        // quantized linear's weight is quantized from f32, its bias written in f32.)
        for name in &modified {
            if !quantized.iter().any(|(m, _)| name == &format!("{m}.weight") || name == &format!("{m}.bias")) {
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
            .map(|(m, _)| groups.of(m))
            .collect();
        let mut histograms = BTreeMap::new();
        if !hist_groups.is_empty() {
            let mut hs = BTreeMap::new();
            for g in &hist_groups {
                let (lo, hi) = stats_of(g)?.tensor_range().unwrap_or((0.0, 0.0));
                hs.insert(g.clone(), Histogram::with_range(lo, hi, HISTOGRAM_BINS));
            }
            let mut obs2 = Observe::new(groups.clone());
            obs2.histograms = Some(hs);
            obs2.stop_after = Some(hist_groups.clone());
            pass(self, w, &mut obs2)?;
            histograms = obs2.histograms.unwrap();
        }

        // 4. Quantize, stage by stage, and hand the tensors over.
        let stages = match sequential {
            true => true_sequential_stages(&obs.order, graph, groups),
            false => vec![obs.order.clone()],
        };
        let mut factors: BTreeMap<(String, bool), HessianFactor> = BTreeMap::new();
        let mut sim = Simulate::default();
        let mut done: BTreeSet<String> = BTreeSet::new();
        for (k, stage) in stages.iter().enumerate() {
            let in_stage = |m: &str| stage.contains(&groups.of(m));
            // Each stage sees the earlier ones quantized: a pass gathers its GPTQ Hessians, stopping
            // once it has them (what comes after the stage is not computed).
            let fresh = if sequential {
                let gptq: BTreeSet<String> = quantized
                    .iter()
                    .filter(|(m, s)| in_stage(m) && s.weight_method == WeightMethod::Gptq)
                    .map(|(m, _)| groups.of(m))
                    .collect();
                if gptq.is_empty() {
                    BTreeMap::new()
                } else {
                    let mut o = Observe::new(groups.clone());
                    o.hessian_groups = gptq.clone();
                    o.stop_after = Some(gptq);
                    o.through = Some(&sim);
                    pass(self, w, &mut o)?;
                    timer.lap(&format!("stage {k} pass"));
                    o.hessians
                }
            } else {
                BTreeMap::new()
            };
            for job in &up.jobs {
                let Job::Quantize { module, spec, .. } = job else { continue };
                let m = rel(module);
                if !in_stage(&m) || is_streamed(&m) {
                    continue;
                }
                let g = groups.of(&m);
                let linear = w.linear(&m)?;
                let weight = match spec.weight_method {
                    WeightMethod::MinMax => {
                        let flat: Vec<f32> = linear.weight.iter().copied().collect();
                        rtn::quantize(&flat, linear.out_features(), linear.in_features(), spec)
                    }
                    WeightMethod::Gptq => {
                        let key = (g.clone(), spec.act_order);
                        if !factors.contains_key(&key) || fresh.contains_key(&g) {
                            let h = match fresh.get(&g) {
                                Some(h) => h.matrix(),
                                None => hessian_of(&g).with_context(|| format!("GPTQ on {module}"))?,
                            };
                            let f = HessianFactor::with_order(h.view(), &GptqConfig::default(), spec.act_order)?;
                            factors.insert(key.clone(), f);
                        }
                        let (q, report) = gptq::quantize_with(
                            self.device,
                            linear.weight.view(),
                            &factors[&key],
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
                    (ActQuant::PerToken, _) => ActSim::PerToken { bits: spec.act_bits },
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
                emit(self.exporter.linear_tensors(module, &ql).into())?;
                done.insert(m);
            }
            timer.lap(&format!("stage {k} quantize"));
        }
        if let Some((m, _)) = quantized.iter().find(|(m, _)| !done.contains(m)) {
            bail!("{prefix}{m} saw no calibration input (the forward never computed it)");
        }
        for job in &up.jobs {
            if let Job::Keep(t) = job {
                self.keep(t, w, &prefix, &modified, emit)?;
            }
        }
        Ok(sim)
    }

    /// A float tensor: the checkpoint's bytes, or the smoothed values in the tensor's dtype.
    fn keep(
        &self,
        t: &LogicalTensor,
        w: &Weights,
        prefix: &str,
        modified: &BTreeSet<String>,
        emit: &mut Emit,
    ) -> Result<()> {
        let r = t.name().strip_prefix(prefix).unwrap_or(t.name());
        if modified.contains(r) || matches!(t.source, Source::Computed(_)) {
            let v = w.get(r)?;
            let tensor = Tensor::from_f32_as(t.meta.dtype, &t.meta.shape, &v.iter().copied().collect::<Vec<_>>())?;
            return emit(vec![OutTensor { name: t.name().to_string(), tensor, kind: FLOAT }].into());
        }
        run_job(self.ckpt, self.exporter, &Job::Keep(t.clone()), emit)
    }

    /// Folds one subgraph's smoothing (or AWQ scales) into `w`; returns the map its consumers'
    /// input went through.
    #[allow(clippy::too_many_arguments)]
    fn apply_smoothing(
        &self,
        w: &mut Weights,
        sg: &Subgraph,
        obs: &Observe,
        groups: &InputGroups,
        modified: &mut BTreeSet<String>,
        stored: &dyn Fn(&str) -> Option<DType>,
        mut streamed: Option<&mut experts::StreamedExperts>,
    ) -> Result<InputMap> {
        let s = self.smoothing.as_ref().unwrap();
        let mut cfg = s.cfg;
        cfg.shift = sg.shift;
        let group = groups.of(&sg.consumers[0]);
        let stats = obs.stats.get(&group).with_context(|| format!("{group} saw no calibration input"))?;
        // Streamed experts take part through their columns' maxima, all a smoothing reads of them
        // (one more consumer, last); the column factors the smoothing applies are remembered.
        let (away, here): (Vec<String>, Vec<String>) =
            sg.consumers.iter().cloned().partition(|c| streamed.as_ref().is_some_and(|s| s.is_streamed(c)));
        let mut linears: Vec<crate::model::nn::Linear> = here.iter().map(|c| w.linear(c)).collect::<Result<_>>()?;
        if !away.is_empty() {
            let st = streamed.as_mut().unwrap();
            ensure!(
                matches!(sg.kind, Kind::NormLinear { .. }) && !sg.shift && s.awq.is_none(),
                "streamed experts in {:?}",
                sg.kind
            );
            linears.push(st.column_absmax(self.ckpt, &away)?);
        }
        let heads = Heads { num_heads: self.model.text.num_heads, num_kv_heads: self.model.text.num_kv_heads };
        let kind = match sg.kind {
            Kind::NormLinear { .. } => smooth::Subgraph::NormLinear,
            Kind::Ov { .. } => smooth::Subgraph::Ov(heads),
            Kind::UpDown { .. } => smooth::Subgraph::LinearLinear,
        };
        let mut map = match &s.awq {
            None => {
                let consumers: Vec<&crate::model::nn::Linear> = linears.iter().collect();
                consumer_map(kind, &consumers, stats, &cfg)?
            }
            Some(a) => {
                let specs: Vec<Option<QuantSpec>> =
                    here.iter().map(|c| self.recipe.linear_spec(&format!("{}{c}", w.prefix))).collect();
                let consumers: Vec<Consumer> =
                    linears.iter().zip(&specs).map(|(l, spec)| Consumer { linear: l, spec: spec.as_ref() }).collect();
                let x_mean = stats.abs_mean().context("AWQ needs the activations' mean magnitudes")?;
                let h = obs.hessians.get(&group).with_context(|| format!("{group}: no Hessian was gathered"))?;
                let choice = awq::search_scales(self.device, kind, &consumers, &x_mean, h.matrix().view(), &a.cfg)?;
                ConsumerMap { shift: None, scales: choice.scales }
            }
        };
        match &sg.kind {
            Kind::NormLinear { norm } => {
                // Zero-centred norms (Qwen3-Next) compute with `offset + w`: smooth the weight
                // they compute with, store it less the offset.
                let offset = self.model.text.norm_offset;
                let mut g: Array1<f32> = w.vector(&format!("{norm}.weight"))? + offset;
                let bias_name = format!("{norm}.bias");
                let mut b = if w.has(&bias_name) { Some(w.vector(&bias_name)?) } else { None };
                let mut refs: Vec<&mut crate::model::nn::Linear> = linears.iter_mut().collect();
                fold_norm_linears(&mut g, &mut b, &mut refs, &map)?;
                if let Some(st) = streamed.as_mut() {
                    st.scale_columns(&away, &map.scales);
                }
                let mut store = &g - offset;
                // The norm is written in its stored dtype (bf16, fp16), the linears are quantized
                // from f32: fold what will be stored, so the float model stays exact.
                if let Some(dtype) = stored(&format!("{norm}.weight")).filter(|d| *d != DType::F32) {
                    let round = |v: &Array1<f32>| -> Result<Array1<f32>> {
                        let flat: Vec<f32> = v.to_vec();
                        Ok(Array1::from_vec(Tensor::from_f32_as(dtype, &[flat.len()], &flat)?.to_f32()?))
                    };
                    store = round(&store)?;
                    let g_stored = &store + offset;
                    let fix: Vec<f32> =
                        g.iter().zip(&g_stored).map(|(&a, &r)| if r != 0.0 { a / r } else { 1.0 }).collect();
                    for l in refs.iter_mut() {
                        let before = l.weight.clone();
                        for (mut col, &f) in l.weight.columns_mut().into_iter().zip(&fix) {
                            col *= f;
                        }
                        // The bias's rounding moves every consumer's output by W·(b − b_stored).
                        if let (Some(nb), Some(c)) = (&b, &mut l.bias) {
                            let nb_stored = round(nb)?;
                            *c += &(before.dot(nb) - l.weight.dot(&nb_stored));
                        }
                    }
                    if let Some(nb) = &mut b {
                        *nb = round(nb)?;
                    }
                    if let Some(st) = streamed.as_mut() {
                        st.scale_columns(&away, &fix);
                    }
                    map.scales.iter_mut().zip(&fix).for_each(|(s, f)| *s *= f);
                }
                w.set(&format!("{norm}.weight"), store.into_dyn());
                modified.insert(format!("{norm}.weight"));
                if let Some(b) = b {
                    w.set(&bias_name, b.into_dyn());
                    modified.insert(bias_name);
                }
            }
            Kind::Ov { producer } | Kind::UpDown { producer } => {
                let mut p = w.linear(producer)?;
                if matches!(sg.kind, Kind::Ov { .. }) {
                    fold_ov(&mut p, &mut linears[0], &map.scales, heads)?;
                } else {
                    fold_linear_linear(&mut p, &mut linears[0], &map.scales)?;
                }
                put_linear(w, producer, p, modified);
            }
        }
        for (c, l) in here.iter().zip(linears) {
            put_linear(w, c, l, modified);
        }
        Ok((map.shift, map.scales))
    }
}

/// `LAMINA_PHASE_TIMES=1` prints how long each phase of a calibrated unit took (wall and this
/// process's CPU time) on stderr: where a slow calibration spends its time.
struct PhaseTimer {
    unit: Option<String>,
    last: std::cell::Cell<(std::time::Instant, f64)>,
}

impl PhaseTimer {
    fn new(unit: &str) -> PhaseTimer {
        let on = std::env::var_os("LAMINA_PHASE_TIMES").is_some_and(|v| v != "0");
        PhaseTimer {
            unit: on.then(|| unit.to_string()),
            last: std::cell::Cell::new((std::time::Instant::now(), cpu_seconds())),
        }
    }

    fn lap(&self, phase: &str) {
        let Some(unit) = &self.unit else { return };
        let (now, cpu) = (std::time::Instant::now(), cpu_seconds());
        let (t0, c0) = self.last.replace((now, cpu));
        eprintln!("phase {unit} {phase}: {:.2} s wall, {:.2} s CPU", (now - t0).as_secs_f64(), cpu - c0);
    }
}

/// This process's user + system CPU time so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// GPTQ's true-sequential stages of a layer: its input groups in the order the forward computes
/// them, each in the stage after the last one its input depends on. A linear fed channel for
/// channel by another (the graph's v → o, up → down) follows its producer's stage; a norm's
/// consumers read the residual stream, which every earlier stage wrote, so they start a stage
/// after all of them. Without a graph every group is a stage of its own.
fn true_sequential_stages(order: &[String], graph: Option<&LayerGraph>, groups: &InputGroups) -> Vec<Vec<String>> {
    let producer: BTreeMap<String, String> = graph
        .map(|g| g.linear_linears.iter().map(|(p, c, _)| (groups.of(c), groups.of(p))).collect())
        .unwrap_or_default();
    let mut stage: BTreeMap<&str, usize> = BTreeMap::new();
    let mut stages: Vec<Vec<String>> = Vec::new();
    for g in order {
        let s = match producer.get(g).and_then(|p| stage.get(p.as_str())) {
            Some(&p) => p + 1,
            None => stages.len(),
        };
        stage.insert(g, s);
        if stages.len() <= s {
            stages.resize(s + 1, Vec::new());
        }
        stages[s].push(g.clone());
    }
    stages
}

/// The first linear of the unit whose scheme needs calibration data.
fn needs_data(up: &UnitPlan) -> Option<&str> {
    up.jobs.iter().find_map(|j| match j {
        Job::Quantize { module, spec, .. } if spec.needs_calibration() => Some(module.as_str()),
        _ => None,
    })
}

/// The linears of `w` that have a bias.
fn bias_modules(w: &Weights) -> BTreeSet<String> {
    w.map.keys().filter_map(|k| k.strip_suffix(".bias")).map(String::from).collect()
}

fn is_vision(kind: UnitKind) -> bool {
    matches!(kind, UnitKind::VisionPre | UnitKind::VisionBlock(_) | UnitKind::VisionPost)
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
    fn process(&mut self, index: usize, up: &UnitPlan, emit: &mut Emit) -> Result<()> {
        match up.unit.kind {
            UnitKind::Embed => self.embed_unit(index, up, emit),
            UnitKind::TextLayer(i) => self.text_layer(index, i, up, emit),
            k if is_vision(k) => self.vision_unit(up, emit),
            UnitKind::Head => self.head_unit(up, emit),
            _ => self.data_free(up, emit),
        }?;
        for t in &up.unit.tensors {
            crate::model::load::release(self.ckpt, t);
        }
        Ok(())
    }
}

/// Whether the recipe's rotation unties tied embeddings (QuaRot rotates the head, which then
/// differs from the embedding table).
pub fn unties_embeddings(model: &Model, recipe: &Recipe) -> Result<bool> {
    Ok(model.text.tie_word_embeddings && Algorithms::from_recipe(recipe)?.quarot.is_some())
}

/// The routed experts of decoder layer unit `up` when calibration streams them in groups
/// ([`experts`]), as the plan counts them and the run decides. A recipe that rotates (QuaRot) or
/// searches AWQ scales transforms every expert's full weights, which then stay with the layer.
pub fn streamed_experts(model: &Model, recipe: &Recipe, up: &UnitPlan) -> Result<Option<experts::StreamedExperts>> {
    let UnitKind::TextLayer(i) = up.unit.kind else { return Ok(None) };
    let algorithms = Algorithms::from_recipe(recipe)?;
    if algorithms.quarot.is_some() || algorithms.smoothing.as_ref().is_some_and(|s| s.awq.is_some()) {
        return Ok(None);
    }
    let prefix = model.layout.unit_prefix(up.unit.kind);
    let names: BTreeSet<&str> = up.unit.tensors.iter().map(|t| t.name()).collect();
    let full = |r: &str| format!("{prefix}{r}");
    let has_bias = |r: &str| names.contains(format!("{prefix}{r}.bias").as_str());
    let subgraphs = match algorithms.smoothing {
        Some(s) => layer_subgraphs(&s, &decoder::graph(model, i), recipe, &full, &has_bias),
        None => Vec::new(),
    };
    Ok(experts::streamed(model, i, up, &prefix, &subgraphs))
}

/// The tensors the algorithms add to a unit, as the plan must list them: a norm's bias when a
/// smoothing shift is folded into a norm that had none; `lm_head.weight` when QuaRot unties tied
/// embeddings (`embed` is the embedding table's meta, whose dtype and shape it takes).
pub fn planned_additions(
    model: &Model,
    recipe: &Recipe,
    unit: &crate::model::Unit,
    embed: Option<&crate::tensor::TensorMeta>,
) -> Result<Vec<LogicalTensor>> {
    if unit.kind == UnitKind::Head && unties_embeddings(model, recipe)? {
        let name = model.layout.lm_head_weight();
        if unit.tensors.iter().any(|t| t.name() == name) {
            return Ok(Vec::new());
        }
        let e = embed.with_context(|| format!("untying {name}: the checkpoint has no embedding table"))?;
        eprintln!("quarot: {name} becomes its own tensor (the rotated head differs from the embeddings); config.json gets tie_word_embeddings: false");
        return Ok(vec![LogicalTensor {
            meta: crate::tensor::TensorMeta::new(name.clone(), e.dtype, &e.shape),
            source: Source::Computed(name),
        }]);
    }
    let (UnitKind::TextLayer(i), Some(s)) = (unit.kind, Smoothing::from_recipe(recipe)?) else { return Ok(Vec::new()) };
    let prefix = model.layout.unit_prefix(unit.kind);
    let names: BTreeSet<&str> = unit.tensors.iter().map(|t| t.name()).collect();
    let full = |r: &str| format!("{prefix}{r}");
    let has_bias = |r: &str| names.contains(format!("{prefix}{r}.bias").as_str());
    let mut out = Vec::new();
    for sg in layer_subgraphs(&s, &decoder::graph(model, i), recipe, &full, &has_bias) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::load_all;
    use crate::pipeline::{prepare, QuantArgs};
    use std::path::Path;

    /// max |a − b| / max |b|.
    fn relative_error(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// With nothing quantized, what calibration feeds the decoder is the float model's own input:
    /// the tower run unit by unit, the image features spliced at the image tokens, M-RoPE ids,
    /// and Qwen3-VL's deepstack features added after layer 0 — checked against transformers.
    #[test]
    fn vl_samples_reach_the_decoder_as_in_transformers() {
        for name in ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
            let scratch = std::env::temp_dir().join(format!("lamina-vl-cal-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&scratch).unwrap();
            let recipe = scratch.join("float.yaml");
            std::fs::write(
                &recipe,
                "apiversion: modelslim_v1\nspec:\n  process:\n    - type: linear_quant\n      qconfig:\n        \
                 weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}\n      include: [\"nothing\"]\n",
            )
            .unwrap();
            let args = QuantArgs {
                model_path: dir.clone(),
                save_path: Some(scratch.clone()),
                config_path: Some(recipe),
                ..QuantArgs::default()
            };
            let p = prepare(&args).unwrap();
            let ckpt = p.ckpt.as_ref().unwrap();
            let r = load_all(&dir.join("reference.safetensors")).unwrap();
            let image = VisionInput::from_tensors(&r["pixel_values"], r.get("image_grid_thw")).unwrap();
            let samples = vec![CalibSample { ids: r["input_ids"].to_i64().unwrap(), image: Some(image) }];
            let device = crate::device::open("cpu").unwrap();
            let committed = Arc::new(AtomicUsize::new(0));
            let plan = &p.plan;
            let mut cal = Calibrator::new(
                ckpt,
                &plan.model,
                &plan.recipe,
                p.exporter.as_ref(),
                device.as_ref(),
                samples,
                scratch.clone(),
                u64::MAX,
                committed,
            )
            .unwrap();
            for (index, up) in plan.units.iter().enumerate() {
                cal.process(index, up, &mut |_| Ok(())).unwrap();
                let d = || cal.sample(0).unwrap();
                match up.unit.kind {
                    UnitKind::Embed => {
                        let want = r["lm.inputs_embeds"].to_f32().unwrap();
                        let e = relative_error(d().embeds.as_slice().unwrap(), &want);
                        assert!(e <= 1e-4, "{name}: inputs_embeds relative error {e}");
                        if let Some(p) = r.get("lm.position_ids") {
                            let ids = d().positions.ids().clone();
                            let want = p.to_i64().unwrap();
                            let got: Vec<i64> = if ids.nrows() == 3 {
                                ids.iter().copied().collect()
                            } else {
                                (0..3).flat_map(|_| ids.row(0).to_vec()).collect()
                            };
                            assert_eq!(got, want, "{name}: M-RoPE position ids");
                        }
                    }
                    UnitKind::TextLayer(0) => {
                        let key = format!("{}.in", plan.model.layout.text_layer(1));
                        let e = relative_error(d().embeds.as_slice().unwrap(), &r[&key].to_f32().unwrap());
                        assert!(e <= 1e-4, "{name}: {key} relative error {e}");
                        break;
                    }
                    _ => {}
                }
            }
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
}
