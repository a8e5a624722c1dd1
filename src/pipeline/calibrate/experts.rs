//! The routed experts of a MoE layer, streamed in groups during calibration, so that what a
//! calibrated layer holds does not grow with its expert count.
//!
//! Where every routed expert is rounded to nearest with dynamic (or no) activation quantization, as
//! the W8A8 recipes do for MoE layers, calibration needs nothing from the experts but their
//! weights' column maxima (for the smoothing of the norm they read) and their quantized outputs
//! (for the layer's output, the next layer's input). So the layer is built without them:
//! 1. observing, the experts are skipped (nothing after them in the layer reads their output);
//! 2. smoothing the norm they read, their columns' maxima are gathered group by group, and the
//!    column factors the smoothing applies are remembered;
//! 3. the quantized layer runs every sample up to its experts, recording each expert's routed
//!    tokens; then the experts go group by group — load, apply the column factors, round, hand to
//!    the writer, compute their routed tokens for every sample, release — adding into each sample's
//!    sum in expert order, so the sum is exactly what the layer with every expert would compute.
//!
//! `LAMINA_EXPERT_GROUP=N` sets the experts per group (`0` holds them all, as a layer whose experts
//! cannot stream); by default a group is [`GROUP_BYTES`] of f32 weights.

use super::hooks::{dequantize_weight, ActSim, Simulate};
use super::smoothing::{Kind, Subgraph};
use crate::device::Device;
use crate::export::{Exporter, OutTensor};
use crate::io::checkpoint::Checkpoint;
use crate::model::decoder::parts::{add_experts, SwiGlu};
use crate::model::decoder::ForwardOptions;
use crate::model::nn::{Linear, LinearHook};
use crate::model::weights::Weights;
use crate::model::LogicalTensor;
use crate::pipeline::plan::{Job, UnitPlan};
use crate::quant::{rtn, ActQuant, QuantSpec, QuantizedLinear};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{Array2, ArrayView2};
use std::collections::BTreeMap;

/// f32 bytes of expert weights loaded at once, by default.
pub const GROUP_BYTES: u64 = 512 << 20;

/// The module the experts live under, relative to the layer.
pub const MODULE: &str = "mlp.experts";

/// A sample's input to the experts `[tokens, hidden]` and, per expert, its routed tokens and weights.
pub type Pending = (Array2<f32>, Vec<Vec<(usize, f32)>>);

/// One expert's three linears: (relative module, its weight tensor, its scheme).
#[derive(Debug, Clone)]
struct ExpertLinear {
    module: String,
    weight: LogicalTensor,
    spec: QuantSpec,
}

/// A MoE layer's routed experts, when they stream.
#[derive(Debug, Clone)]
pub struct StreamedExperts {
    prefix: String,
    /// Per expert, its gate, up and down linears.
    experts: Vec<[ExpertLinear; 3]>,
    /// Experts per group.
    pub group: usize,
    /// Column factors smoothing applied to each consumer (`mlp.experts.3.gate_proj`), in order.
    columns: BTreeMap<String, Vec<Vec<f32>>>,
}

/// Experts per group: `LAMINA_EXPERT_GROUP` when set (0 = do not stream), else what fits
/// [`GROUP_BYTES`] of f32 weights.
pub fn group_size(expert_f32_bytes: u64) -> usize {
    match std::env::var("LAMINA_EXPERT_GROUP").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => n,
        None => (GROUP_BYTES / expert_f32_bytes.max(1)).max(1) as usize,
    }
}

/// The experts of decoder layer unit `up` (prefix `prefix`) when they can stream: a MoE layer of an
/// architecture that adds its experts' sum straight to the residual stream, every expert linear
/// rounded to nearest without calibrated activations and without a bias, and no smoothing touching
/// them except a shift-free scaling of the norm they read. `subgraphs` are the layer's smoothing
/// subgraphs.
pub fn streamed(
    model: &crate::model::Model,
    layer: usize,
    up: &UnitPlan,
    prefix: &str,
    subgraphs: &[Subgraph],
) -> Option<StreamedExperts> {
    let moe = model.text.moe.as_ref().filter(|m| m.is_moe_layer(layer))?;
    // Architectures whose layer adds the MoE block's output straight to the residual stream (not
    // GLM-4's, which normalizes it first).
    use crate::model::decoder::Arch;
    if !matches!(Arch::of(model.family), Arch::Standard | Arch::Mla | Arch::HunYuan) {
        return None;
    }
    let in_experts = |name: &str| name.strip_prefix(prefix).is_some_and(|r| r.starts_with(&format!("{MODULE}.")));
    let mut linears: BTreeMap<String, ExpertLinear> = BTreeMap::new();
    for t in up.unit.tensors.iter().filter(|t| in_experts(t.name())) {
        let job = up.jobs.iter().find_map(|j| match j {
            Job::Quantize { weight, spec, bias, module } if weight.name() == t.name() => {
                Some((module.clone(), *spec, bias.is_some()))
            }
            _ => None,
        });
        // A kept expert tensor (a bias, an unquantized linear) or a calibrated scheme: hold them all.
        let (module, spec, has_bias) = job?;
        if has_bias || spec.needs_calibration() {
            return None;
        }
        let rel = module.strip_prefix(prefix).unwrap_or(&module).to_string();
        linears.insert(rel.clone(), ExpertLinear { module: rel, weight: t.clone(), spec });
    }
    for sg in subgraphs {
        let touches = sg.consumers.iter().any(|c| c.starts_with(&format!("{MODULE}.")))
            || matches!(&sg.kind, Kind::Ov { producer } | Kind::UpDown { producer } if producer.starts_with(&format!("{MODULE}.")));
        if touches && (!matches!(sg.kind, Kind::NormLinear { .. }) || sg.shift) {
            return None;
        }
    }
    let mut experts = Vec::with_capacity(moe.num_experts);
    for j in 0..moe.num_experts {
        let mut take = |p: &str| linears.remove(&format!("{MODULE}.{j}.{p}"));
        experts.push([take("gate_proj")?, take("up_proj")?, take("down_proj")?]);
    }
    if !linears.is_empty() {
        return None;
    }
    let per_expert: u64 = experts.first()?.iter().map(|l| l.weight.meta.numel() as u64 * 4).sum();
    let group = group_size(per_expert);
    if group == 0 {
        return None;
    }
    Some(StreamedExperts { prefix: prefix.to_string(), experts, group, columns: BTreeMap::new() })
}

impl StreamedExperts {
    /// f32 bytes of one group's weights.
    pub fn group_bytes(&self) -> u64 {
        let per_expert: u64 = self.experts[0].iter().map(|l| l.weight.meta.numel() as u64 * 4).sum();
        per_expert * self.group.min(self.experts.len()) as u64
    }

    /// Whether tensor `t` is one of the streamed experts' (not loaded with the layer).
    pub fn holds(&self, t: &LogicalTensor) -> bool {
        self.experts.iter().flatten().any(|l| l.weight.name() == t.name())
    }

    /// Whether `module` (relative) is a streamed expert linear.
    pub fn is_streamed(&self, module: &str) -> bool {
        module.starts_with(&format!("{MODULE}.")) && self.experts.iter().flatten().any(|l| l.module == module)
    }

    fn load(&self, ckpt: &Checkpoint, ls: &[&ExpertLinear]) -> Result<Weights> {
        Weights::load_tensors(ckpt, ls.iter().map(|l| &l.weight), &self.prefix)
    }

    /// `[1, in]`: the largest |weight| of each input column over the streamed `consumers`, read group
    /// by group. Smoothing sees the consumers' weights only through these maxima.
    pub fn column_absmax(&self, ckpt: &Checkpoint, consumers: &[String]) -> Result<Linear> {
        let ls: Vec<&ExpertLinear> = self.experts.iter().flatten().filter(|l| consumers.contains(&l.module)).collect();
        ensure!(!ls.is_empty(), "no streamed expert among {consumers:?}");
        let cols = ls[0].weight.meta.shape[1];
        let mut max = Array2::<f32>::zeros((1, cols));
        for chunk in ls.chunks(self.group * 3) {
            let w = self.load(ckpt, chunk)?;
            for l in chunk {
                let m = w.matrix(&format!("{}.weight", l.module))?;
                ensure!(m.ncols() == cols, "{}{} reads {} channels, not {cols}", self.prefix, l.module, m.ncols());
                for row in m.rows() {
                    for (a, &v) in max.row_mut(0).iter_mut().zip(row) {
                        *a = a.max(v.abs());
                    }
                }
            }
        }
        Ok(Linear { weight: max, bias: None })
    }

    /// Remembers that smoothing multiplied the input columns of `consumers` by `factors`.
    pub fn scale_columns(&mut self, consumers: &[String], factors: &[f32]) {
        let streamed: Vec<String> = consumers.iter().filter(|c| self.is_streamed(c)).cloned().collect();
        for c in streamed {
            self.columns.entry(c).or_default().push(factors.to_vec());
        }
    }

    /// Step 3: adds every expert's routed outputs, as quantized, to `sums[s]` for each sample's
    /// recorded `(input, routes)`, group by group, handing each expert's tensors to `emit`.
    pub fn run(
        &self,
        ckpt: &Checkpoint,
        exporter: &dyn Exporter,
        device: &dyn Device,
        pending: &[Pending],
        sums: &mut [Array2<f32>],
        emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>,
    ) -> Result<()> {
        for (g, group) in self.experts.chunks(self.group).enumerate() {
            let first = g * self.group;
            let ls: Vec<&ExpertLinear> = group.iter().flatten().collect();
            let mut w = self.load(ckpt, &ls)?;
            let mut hook = ActOnly::default();
            let mut built = Vec::with_capacity(group.len());
            for (k, e) in group.iter().enumerate() {
                let mut parts = Vec::with_capacity(3);
                for l in e {
                    let mut linear = w.linear(&l.module)?;
                    for f in self.columns.get(&l.module).into_iter().flatten() {
                        // As smoothing scales a resident consumer's columns.
                        for mut row in linear.weight.rows_mut() {
                            row.iter_mut().zip(f).for_each(|(v, &s)| *v *= s);
                        }
                    }
                    w.map.remove(&format!("{}.weight", l.module));
                    let flat: Vec<f32> = linear.weight.iter().copied().collect();
                    let weight = rtn::quantize(&flat, linear.out_features(), linear.in_features(), &l.spec);
                    drop(flat);
                    let act = match l.spec.act {
                        ActQuant::PerToken => ActSim::PerToken { bits: l.spec.act_bits },
                        ActQuant::None => ActSim::None,
                        ActQuant::PerTensorStatic { .. } => bail!("{}: a static scheme cannot stream", l.module),
                    };
                    hook.acts.insert(l.module.clone(), act);
                    let sim = Linear { weight: dequantize_weight(&weight), bias: None };
                    let ql = QuantizedLinear { spec: l.spec, weight, bias: None, write_bias: false, input: None };
                    emit(exporter.linear_tensors(&format!("{}{}", self.prefix, l.module), &ql))?;
                    parts.push(sim);
                }
                let (Some(down_proj), Some(up_proj), Some(gate_proj)) = (parts.pop(), parts.pop(), parts.pop()) else {
                    unreachable!("three linears an expert")
                };
                let name = format!("{MODULE}.{}", first + k);
                let names = ["gate_proj", "up_proj", "down_proj"].map(|p| format!("{name}.{p}"));
                built.push(SwiGlu { names, gate_proj, up_proj, down_proj });
            }
            for ((x, routes), sum) in pending.iter().zip(sums.iter_mut()) {
                let chosen = &routes[first..first + group.len()];
                add_experts(device, &built, chosen, x.view(), &mut hook, ForwardOptions::default(), sum)
                    .with_context(|| format!("{}{MODULE} {first}..{}", self.prefix, first + group.len()))?;
            }
        }
        Ok(())
    }
}

/// Runs the streamed experts as quantized: their linears hold the dequantized weights; the input is
/// quantized as the kernel will (what [`Simulate`] does with its linears).
#[derive(Default)]
struct ActOnly {
    acts: BTreeMap<String, ActSim>,
}

impl LinearHook for ActOnly {
    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        match self.acts.get(name) {
            Some(act) => layer.forward(device, act.apply(x).view()),
            None => layer.forward(device, x),
        }
    }
}

/// The quantized layer up to its streamed experts: its linears as [`Simulate`] runs them, and each
/// sample's expert input and routes recorded.
pub struct Recorder<'a> {
    pub sim: &'a mut Simulate,
    pub pending: Vec<Pending>,
}

impl LinearHook for Recorder<'_> {
    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        self.sim.linear(device, name, layer, x)
    }

    fn kv_cache(&mut self, module: &str, k: &mut Array2<f32>, v: &mut Array2<f32>) {
        self.sim.kv_cache(module, k, v)
    }

    fn defer_experts(&mut self, module: &str, x: ArrayView2<f32>, routes: &[Vec<(usize, f32)>]) -> bool {
        if module != MODULE {
            return false;
        }
        self.pending.push((x.to_owned(), routes.to_vec()));
        true
    }
}
