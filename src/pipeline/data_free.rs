//! The data-free transform: each job of a unit is copied or quantized on its own, straight from the
//! mapped checkpoint, and its input pages are given back as soon as no later job needs them.

use super::load;
use super::plan::{Job, UnitPlan};
use super::stages::UnitProcessor;
use crate::export::{Exporter, OutTensor, FLOAT};
use crate::io::checkpoint::Checkpoint;
use crate::model::LogicalTensor;
use crate::quant::{rtn, QuantizedLinear};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct DataFree<'a> {
    pub ckpt: &'a Checkpoint,
    pub exporter: &'a dyn Exporter,
}

impl UnitProcessor for DataFree<'_> {
    fn process(
        &mut self,
        _index: usize,
        unit: &UnitPlan,
        emit: &mut dyn FnMut(Vec<OutTensor>) -> Result<()>,
    ) -> Result<()> {
        let ckpt = self.ckpt;
        // Jobs run in file order (the writer places each output wherever the plan put it), so a cold read
        // streams through the file instead of jumping from expert 1 to expert 10 to expert 100.
        let mut jobs: Vec<&Job> = unit.jobs.iter().collect();
        jobs.sort_by_cached_key(|j| load::span(ckpt, inputs(j)[0]).map(|(f, s, _)| (f, s)));
        // Pages are released after the last job that reads them: gate and up of an expert share theirs.
        let mut last_use = HashMap::new();
        for (k, j) in jobs.iter().enumerate() {
            for t in inputs(j) {
                last_use.insert(load::span(ckpt, t), k);
            }
        }
        for (k, job) in jobs.iter().enumerate() {
            let out = run_job(ckpt, self.exporter, job)?;
            // The outputs own their bytes, so the input pages can go before the writer has them.
            for t in inputs(job) {
                if last_use.get(&load::span(ckpt, t)) == Some(&k) {
                    load::release(ckpt, t);
                }
            }
            emit(out)?;
        }
        Ok(())
    }
}

/// The tensors a job reads, the main one first.
fn inputs(job: &Job) -> Vec<&LogicalTensor> {
    match job {
        Job::Keep(t) => vec![t],
        Job::Quantize { weight, bias, .. } => std::iter::once(weight).chain(bias.as_ref()).collect(),
        Job::KvCache { .. } => Vec::new(),
    }
}

/// Runs one job with round-to-nearest weights.
pub fn run_job(ckpt: &Checkpoint, exporter: &dyn Exporter, job: &Job) -> Result<Vec<OutTensor>> {
    match job {
        Job::Keep(t) => Ok(vec![OutTensor {
            name: t.meta.name.clone(),
            tensor: Tensor::from_bytes(t.meta.dtype, &t.meta.shape, load::take_bytes(ckpt, t)?),
            kind: FLOAT,
        }]),
        Job::Quantize { module, weight, bias, spec } => {
            let view = load::matrix_view(ckpt, weight)?;
            let q = QuantizedLinear {
                spec: *spec,
                weight: rtn::quantize_view(&view, spec).map_err(|e| load::non_finite(ckpt, weight, e))?,
                bias: bias.as_ref().map(|b| load::f32s(ckpt, b)).transpose()?,
                write_bias: bias.is_some(),
                input: None,
            };
            Ok(exporter.linear_tensors(module, &q))
        }
        Job::KvCache { module, .. } => {
            bail!("{module}: the KV-cache scales are measured on calibration data; only a calibrated run computes them")
        }
    }
}
