//! The plan: before any byte is computed, decide what every tensor becomes, where it is written,
//! and how much memory each unit needs, then say whether the run fits the budget.

use crate::export::{Exporter, OutMeta, FLOAT};
use crate::io::shards::ShardLayout;
use crate::model::layout::UnitKind;
use crate::model::{LogicalTensor, Model, Source, Unit};
use crate::quant::{QuantSpec, Recipe};
use anyhow::Result;

/// One piece of work inside a unit.
#[derive(Debug, Clone)]
pub enum Job {
    /// Written unchanged.
    Keep(LogicalTensor),
    /// A linear quantized by `spec`; its bias, if any, goes with it.
    Quantize { module: String, weight: LogicalTensor, bias: Option<LogicalTensor>, spec: QuantSpec },
}

impl Job {
    /// Bytes held while the job runs, beyond its mapped input: the f32 working copy, the
    /// integer weights, a de-fused copy of an expert slice, and the outputs.
    fn work_bytes(&self, outputs: u64) -> u64 {
        match self {
            Job::Keep(t) => t.meta.nbytes() + outputs,
            Job::Quantize { weight, .. } => {
                let n = weight.meta.numel() as u64;
                let defused = if matches!(weight.source, Source::Expert { .. }) { weight.meta.nbytes() } else { 0 };
                n * 4 + n + defused + outputs
            }
        }
    }

    /// Bytes of the input the job maps.
    fn input_bytes(&self) -> u64 {
        match self {
            Job::Keep(t) => t.meta.nbytes(),
            Job::Quantize { weight, bias, .. } => weight.meta.nbytes() + bias.as_ref().map_or(0, |b| b.meta.nbytes()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UnitPlan {
    pub unit: Unit,
    pub jobs: Vec<Job>,
    /// Every output tensor of the unit, in job order.
    pub outputs: Vec<OutMeta>,
    pub out_bytes: u64,
    /// The most memory one job of this unit holds at once.
    pub peak_job: u64,
}

#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub budget: u64,
    /// The process itself: code, allocator, thread stacks.
    pub base: u64,
    /// Index of the unit with the highest need, and that need.
    pub largest_unit: usize,
    pub unit_peak: u64,
    /// Units read ahead of the one being processed.
    pub prefetch: usize,
    /// Predicted peak with that prefetch depth.
    pub peak: u64,
    pub fits: bool,
}

pub struct Plan {
    pub model: Model,
    pub recipe: Recipe,
    pub units: Vec<UnitPlan>,
    pub shards: ShardLayout,
    pub memory: MemoryPlan,
}

pub const BASE_BYTES: u64 = 96 << 20;
const MAX_PREFETCH: usize = 2;

impl Plan {
    pub fn bytes_in(&self) -> u64 {
        self.units.iter().map(|u| u.unit.stored_bytes).sum()
    }
    pub fn bytes_out(&self) -> u64 {
        self.units.iter().map(|u| u.out_bytes).sum()
    }
    pub fn outputs(&self) -> impl Iterator<Item = &OutMeta> {
        self.units.iter().flat_map(|u| u.outputs.iter())
    }
    /// The scheme of every quantized linear, in plan order.
    pub fn specs(&self) -> Vec<QuantSpec> {
        let jobs = self.units.iter().flat_map(|u| u.jobs.iter());
        jobs.filter_map(|j| if let Job::Quantize { spec, .. } = j { Some(*spec) } else { None }).collect()
    }
}

/// Decides each unit's jobs from the recipe.
pub fn plan_unit(unit: Unit, recipe: &Recipe, exporter: &dyn Exporter) -> Result<UnitPlan> {
    let mut jobs = Vec::new();
    let mut consumed = std::collections::HashSet::new();
    for t in &unit.tensors {
        let Some(module) = t.linear_module() else {
            continue;
        };
        // Multi-token-prediction layers are written as they are: vLLM-Ascend serves the MTP draft
        // unquantized and reads its linears as FLOAT (vllm_ascend/quantization/modelslim_config.py:
        // "The quantized MTP layer of deepseek on the NPU is not quantized").
        if matches!(unit.kind, UnitKind::Mtp(_)) {
            continue;
        }
        let Some(spec) = recipe.linear_spec(module) else {
            continue;
        };
        exporter.check_linear(module, &spec, t.meta.shape[0], t.meta.shape[1])?;
        let bias_name = format!("{module}.bias");
        let bias = unit.tensors.iter().find(|b| b.name() == bias_name).cloned();
        if let Some(b) = &bias {
            consumed.insert(b.name().to_string());
        }
        consumed.insert(t.name().to_string());
        jobs.push(Job::Quantize { module: module.to_string(), weight: t.clone(), bias, spec });
    }
    for t in &unit.tensors {
        if !consumed.contains(t.name()) {
            jobs.push(Job::Keep(t.clone()));
        }
    }
    jobs.sort_by(|a, b| job_key(a).cmp(job_key(b)));
    let mut outputs = Vec::new();
    let mut peak_job = 0;
    for j in &jobs {
        let outs = job_outputs(j, exporter);
        let out_bytes: u64 = outs.iter().map(|o| o.meta.nbytes()).sum();
        peak_job = peak_job.max(j.input_bytes() + j.work_bytes(out_bytes));
        outputs.extend(outs);
    }
    let out_bytes = outputs.iter().map(|o| o.meta.nbytes()).sum();
    Ok(UnitPlan { unit, jobs, outputs, out_bytes, peak_job })
}

fn job_key(j: &Job) -> &str {
    match j {
        Job::Keep(t) => t.name(),
        Job::Quantize { weight, .. } => weight.name(),
    }
}

/// The tensors a job writes.
pub fn job_outputs(job: &Job, exporter: &dyn Exporter) -> Vec<OutMeta> {
    match job {
        Job::Keep(t) => vec![OutMeta { meta: t.meta.clone(), kind: FLOAT }],
        Job::Quantize { module, weight, bias, spec } => {
            exporter.linear_layout(module, spec, weight.meta.shape[0], weight.meta.shape[1], bias.is_some())
        }
    }
}

/// Sizes the read-ahead to the budget: the unit being processed needs its largest job, and each
/// unit read ahead occupies its input bytes in memory (page cache).
pub fn plan_memory(units: &[UnitPlan], budget: u64) -> MemoryPlan {
    let (largest_unit, unit_peak) =
        units.iter().enumerate().map(|(i, u)| (i, u.peak_job)).max_by_key(|&(_, p)| p).unwrap_or((0, 0));
    let max_input = units.iter().map(|u| u.unit.stored_bytes).max().unwrap_or(0);
    let need = |d: usize| BASE_BYTES + unit_peak + d as u64 * max_input;
    let fits = need(0) <= budget;
    let prefetch = (0..=MAX_PREFETCH).rev().find(|&d| need(d) <= budget).unwrap_or(0);
    MemoryPlan { budget, base: BASE_BYTES, largest_unit, unit_peak, prefetch, peak: need(prefetch), fits }
}
