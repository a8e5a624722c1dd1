//! The plan: before any byte is computed, decide what every tensor becomes, where it is written,
//! and how much memory each unit needs, then say whether the run fits the budget.

use super::data_free::KEEP_PIECE;
use crate::export::{Exporter, OutMeta, FLOAT};
use crate::io::shards::ShardLayout;
use crate::model::layout::UnitKind;
use crate::model::{LogicalTensor, Model, Source, Unit};
use crate::quant::recipe::KvCacheSpec;
use crate::quant::{QuantSpec, Recipe};
use anyhow::Result;

/// One piece of work inside a unit.
#[derive(Debug, Clone)]
pub enum Job {
    /// Written unchanged.
    Keep(LogicalTensor),
    /// A linear quantized by `spec`; its bias, if any, goes with it.
    Quantize { module: String, weight: LogicalTensor, bias: Option<LogicalTensor>, spec: QuantSpec },
    /// The int8 KV cache (C8) of attention module `module` (`model.layers.0.self_attn`): per-channel
    /// scales and offsets of its `k_channels` cached key and `v_channels` value channels, which
    /// calibration measures on what the cache holds.
    KvCache { module: String, k_channels: usize, v_channels: usize, spec: KvCacheSpec },
}

impl Job {
    /// Bytes held while the job runs on the data-free path, beyond the outputs in flight to the
    /// writer: its mapped input and its outputs (a quantized expert read column-wise also builds a
    /// transposed copy of its integers). A kept tensor larger than a piece is copied piece by piece,
    /// each piece's pages given back as it goes.
    fn work_bytes(&self, outputs: u64) -> u64 {
        match self {
            Job::Keep(t) if matches!(t.source, Source::Stored(_)) => 2 * t.meta.nbytes().min(KEEP_PIECE as u64),
            Job::Keep(t) => 2 * t.meta.nbytes(),
            Job::KvCache { .. } => outputs,
            Job::Quantize { weight, .. } => {
                let transposed = if matches!(weight.source, Source::Expert { .. }) { outputs } else { 0 };
                self.input_bytes() + outputs + transposed
            }
        }
    }

    /// Bytes of the input the job maps.
    fn input_bytes(&self) -> u64 {
        match self {
            Job::Keep(t) => t.meta.nbytes(),
            Job::KvCache { .. } => 0,
            Job::Quantize { weight, bias, .. } => weight.meta.nbytes() + bias.as_ref().map_or(0, |b| b.meta.nbytes()),
        }
    }

    /// The largest message this job hands the writer: its outputs, or one piece of a kept tensor.
    fn message_bytes(&self, outputs: u64) -> u64 {
        match self {
            Job::Keep(t) if matches!(t.source, Source::Stored(_)) => outputs.min(KEEP_PIECE as u64),
            _ => outputs,
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
    /// The most memory one job of this unit holds at once (for a calibrated unit, what the whole
    /// unit holds while calibrating).
    pub peak_job: u64,
    /// The largest message its jobs hand the writer.
    pub max_message: u64,
}

#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub budget: u64,
    /// The process itself: code, allocator, thread stacks.
    pub base: u64,
    /// Index of the unit with the highest need, and that need.
    pub largest_unit: usize,
    pub unit_peak: u64,
    /// Outputs handed over but not yet written: the messages the channel to the writer holds and
    /// the one being written.
    pub in_flight: u64,
    /// Bytes of input read ahead of the transform (in the page cache, ready when it gets there).
    pub read_ahead: u64,
    /// Predicted peak: base + largest unit + in flight + read-ahead.
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
/// The most input read ahead: enough to keep a disk streaming while the transform works on what
/// it already has, small next to any budget.
pub const MAX_READ_AHEAD: u64 = 256 << 20;
/// Messages to the writer that may wait in its channel.
pub const WRITER_QUEUE: usize = 2;

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
        self.linears().into_iter().map(|(_, s)| s).collect()
    }
    /// Every quantized linear and its scheme, in plan order.
    pub fn linears(&self) -> Vec<(String, QuantSpec)> {
        let jobs = self.units.iter().flat_map(|u| u.jobs.iter());
        jobs.filter_map(
            |j| if let Job::Quantize { module, spec, .. } = j { Some((module.clone(), *spec)) } else { None },
        )
        .collect()
    }
    /// The linears kept float (their weights are written unchanged).
    pub fn float_linears(&self) -> Vec<String> {
        let jobs = self.units.iter().flat_map(|u| u.jobs.iter());
        jobs.filter_map(|j| if let Job::Keep(t) = j { t.linear_module().map(String::from) } else { None }).collect()
    }
}

/// Decides each unit's jobs from the recipe.
/// Decides a unit's jobs: a `Quantize` for every linear the recipe quantizes, a `Keep` for every other
/// tensor, and the `extra` jobs (the KV caches of a decoder layer).
pub fn plan_unit(unit: Unit, recipe: &Recipe, exporter: &dyn Exporter, extra: Vec<Job>) -> Result<UnitPlan> {
    let mut jobs = extra;
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
    let (mut peak_job, mut max_message) = (0, 0);
    for j in &jobs {
        let outs = job_outputs(j, exporter);
        let out_bytes: u64 = outs.iter().map(|o| o.meta.nbytes()).sum();
        peak_job = peak_job.max(j.work_bytes(out_bytes));
        max_message = max_message.max(j.message_bytes(out_bytes));
        outputs.extend(outs);
    }
    let out_bytes = outputs.iter().map(|o| o.meta.nbytes()).sum();
    Ok(UnitPlan { unit, jobs, outputs, out_bytes, peak_job, max_message })
}

fn job_key(j: &Job) -> &str {
    match j {
        Job::Keep(t) => t.name(),
        Job::Quantize { weight, .. } => weight.name(),
        Job::KvCache { module, .. } => module,
    }
}

/// The tensors a job writes.
pub fn job_outputs(job: &Job, exporter: &dyn Exporter) -> Vec<OutMeta> {
    match job {
        Job::Keep(t) => vec![OutMeta { meta: t.meta.clone(), kind: FLOAT }],
        Job::Quantize { module, weight, bias, spec } => {
            exporter.linear_layout(module, spec, weight.meta.shape[0], weight.meta.shape[1], bias.is_some())
        }
        Job::KvCache { module, k_channels, v_channels, .. } => {
            exporter.kv_cache_layout(module, *k_channels, *v_channels)
        }
    }
}

/// The predicted peak and the read-ahead that fits the budget: the unit being processed needs its
/// largest job (or, calibrating, what its calibration holds), the writer's queue holds a few messages,
/// and up to [`MAX_READ_AHEAD`] bytes of input are read ahead when the budget has room for them.
pub fn plan_memory(units: &[UnitPlan], budget: u64) -> MemoryPlan {
    let (largest_unit, unit_peak) =
        units.iter().enumerate().map(|(i, u)| (i, u.peak_job)).max_by_key(|&(_, p)| p).unwrap_or((0, 0));
    let in_flight = (WRITER_QUEUE as u64 + 1) * units.iter().map(|u| u.max_message).max().unwrap_or(0);
    let need = BASE_BYTES + unit_peak + in_flight;
    let read_ahead = budget.saturating_sub(need).min(MAX_READ_AHEAD);
    MemoryPlan {
        budget,
        base: BASE_BYTES,
        largest_unit,
        unit_peak,
        in_flight,
        read_ahead,
        peak: need + read_ahead,
        fits: need <= budget,
    }
}
