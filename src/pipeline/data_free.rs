//! The data-free transform: each job of a unit is copied or quantized on its own, and its
//! input pages are given back as soon as it is done.

use super::load;
use super::plan::{Job, UnitPlan};
use super::stages::UnitProcessor;
use crate::export::{Exporter, OutTensor, FLOAT};
use crate::io::checkpoint::Checkpoint;
use crate::quant::{rtn, QuantizedLinear};
use crate::tensor::Tensor;
use anyhow::Result;

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
        for job in &unit.jobs {
            emit(run_job(self.ckpt, self.exporter, job)?)?;
            match job {
                Job::Keep(t) => load::release(self.ckpt, t),
                Job::Quantize { weight, bias, .. } => {
                    load::release(self.ckpt, weight);
                    if let Some(b) = bias {
                        load::release(self.ckpt, b);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one job with round-to-nearest weights.
pub fn run_job(ckpt: &Checkpoint, exporter: &dyn Exporter, job: &Job) -> Result<Vec<OutTensor>> {
    match job {
        Job::Keep(t) => Ok(vec![OutTensor {
            name: t.meta.name.clone(),
            tensor: Tensor::from_bytes(t.meta.dtype, &t.meta.shape, load::bytes(ckpt, t)?),
            kind: FLOAT,
        }]),
        Job::Quantize { module, weight, bias, spec } => {
            let w = load::f32s(ckpt, weight)?;
            let (rows, cols) = (weight.meta.shape[0], weight.meta.shape[1]);
            let q = QuantizedLinear {
                spec: *spec,
                weight: rtn::quantize(&w, rows, cols, spec),
                bias: bias.as_ref().map(|b| load::f32s(ckpt, b)).transpose()?,
                write_bias: bias.is_some(),
                input: None,
            };
            drop(w);
            Ok(exporter.linear_tensors(module, &q))
        }
    }
}
