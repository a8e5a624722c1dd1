//! The data-free transform: each job of a unit is copied or quantized on its own, straight from the
//! mapped checkpoint, and its input pages are given back as soon as no later job needs them.

use super::plan::{Job, UnitPlan};
use super::stages::{Emit, Output, UnitProcessor};
use crate::export::{Exporter, OutMeta, OutTensor, FLOAT};
use crate::io::checkpoint::Checkpoint;
use crate::model::load;
use crate::model::{LogicalTensor, Source};
use crate::quant::{rtn, QuantizedLinear};
use crate::tensor::Tensor;
use anyhow::{bail, Result};
use std::collections::HashMap;

pub struct DataFree<'a> {
    pub ckpt: &'a Checkpoint,
    pub exporter: &'a dyn Exporter,
}

impl UnitProcessor for DataFree<'_> {
    fn process(&mut self, _index: usize, unit: &UnitPlan, emit: &mut Emit) -> Result<()> {
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
            // A kept tensor goes out piece by piece, each piece's pages given back as it is copied.
            if let Some(out) = quantize_job(ckpt, self.exporter, job)? {
                // The outputs own their bytes, so the input pages can go before the writer has them.
                for t in inputs(job) {
                    if last_use.get(&load::span(ckpt, t)) == Some(&k) {
                        load::release(ckpt, t);
                    }
                }
                emit(out.into())?;
            } else {
                run_job(ckpt, self.exporter, job, emit)?;
            }
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

/// Bytes of a kept tensor copied and handed to the writer at once.
pub const KEEP_PIECE: usize = 16 << 20;

/// Runs one job with round-to-nearest weights, handing its outputs to `emit`. A tensor kept as it is goes
/// out in pieces of [`KEEP_PIECE`] bytes, each piece's mapped pages given back as it is copied, so that a
/// large embedding table or `lm_head` is never held whole.
pub fn run_job(ckpt: &Checkpoint, exporter: &dyn Exporter, job: &Job, emit: &mut Emit) -> Result<()> {
    match quantize_job(ckpt, exporter, job)? {
        Some(out) => emit(out.into()),
        None => match job {
            Job::Keep(t) => keep_in_pieces(ckpt, t, emit),
            Job::KvCache { module, .. } => {
                bail!("{module}: the KV-cache scales are measured on calibration data; only a calibrated run computes them")
            }
            Job::Quantize { .. } => unreachable!("quantize_job handles every quantize job"),
        },
    }
}

/// The outputs of a quantize job (round-to-nearest); `None` for a job that keeps a tensor.
fn quantize_job(ckpt: &Checkpoint, exporter: &dyn Exporter, job: &Job) -> Result<Option<Vec<OutTensor>>> {
    let Job::Quantize { module, weight, bias, spec } = job else { return Ok(None) };
    let view = load::matrix_view(ckpt, weight)?;
    let q = QuantizedLinear {
        spec: *spec,
        weight: rtn::quantize_view(&view, spec).map_err(|e| load::non_finite(ckpt, weight, e))?,
        bias: bias.as_ref().map(|b| load::f32s(ckpt, b)).transpose()?,
        write_bias: bias.is_some(),
        input: None,
    };
    Ok(Some(exporter.linear_tensors(module, &q)))
}

/// Copies a kept tensor to the writer in pieces (a stored one; an expert slice or a tensor that is made
/// rather than read goes whole).
fn keep_in_pieces(ckpt: &Checkpoint, t: &LogicalTensor, emit: &mut Emit) -> Result<()> {
    let meta = OutMeta { meta: t.meta.clone(), kind: FLOAT };
    let Source::Stored(name) = &t.source else {
        let tensor = Tensor::from_bytes(t.meta.dtype, &t.meta.shape, load::bytes(ckpt, t)?);
        return emit(vec![OutTensor { name: t.meta.name.clone(), tensor, kind: FLOAT }].into());
    };
    let (f, e) = ckpt.require(name)?;
    let piece = keep_piece();
    if e.nbytes() <= piece {
        let tensor = Tensor::from_bytes(t.meta.dtype, &t.meta.shape, load::take_bytes(ckpt, t)?);
        return emit(vec![OutTensor { name: t.meta.name.clone(), tensor, kind: FLOAT }].into());
    }
    for (k, chunk) in f.bytes(e).chunks(piece).enumerate() {
        let bytes = chunk.to_vec();
        let start = e.start + k * piece;
        f.release(start, start + chunk.len());
        emit(Output::Piece { meta: meta.clone(), offset: (k * piece) as u64, bytes })?;
    }
    Ok(())
}

/// [`KEEP_PIECE`], or `LAMINA_KEEP_PIECE_BYTES` (a testing aid: small pieces on small fixtures).
fn keep_piece() -> usize {
    std::env::var("LAMINA_KEEP_PIECE_BYTES").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(KEEP_PIECE)
}
