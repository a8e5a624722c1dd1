//! Reading logical tensors out of the checkpoint maps, and giving their pages back.

use crate::io::checkpoint::Checkpoint;
use crate::model::{moe, LogicalTensor, Source, Unit};
use crate::tensor::decode_f32_into;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// The tensor's bytes in its stored dtype, de-fused if it is an expert slice.
pub fn bytes(ckpt: &Checkpoint, t: &LogicalTensor) -> Result<Vec<u8>> {
    match &t.source {
        Source::Stored(name) => Ok(ckpt.bytes(name)?.to_vec()),
        Source::Computed(name) => bail!("tensor {name} is made by calibration and has no stored bytes"),
        Source::Expert { fused, fused_shape, layout, part, expert } => {
            let (f, e) = ckpt.require(fused)?;
            if e.shape != *fused_shape {
                bail!(
                    "tensor {fused} in {} has shape {:?}, the plan expected {:?}",
                    f.path.display(),
                    e.shape,
                    fused_shape
                );
            }
            Ok(moe::extract(f.bytes(e), e.dtype.size(), fused_shape, *layout, *part, *expert))
        }
    }
}

/// The tensor widened to f32, refusing NaN and infinities (which would poison every scale).
pub fn f32s(ckpt: &Checkpoint, t: &LogicalTensor) -> Result<Vec<f32>> {
    let raw;
    let src: &[u8] = match &t.source {
        Source::Stored(name) => ckpt.bytes(name)?,
        Source::Computed(_) | Source::Expert { .. } => {
            raw = bytes(ckpt, t)?;
            &raw
        }
    };
    let dtype = t.meta.dtype;
    if !dtype.is_float() {
        bail!("tensor {} in {} has dtype {}, not a float type", t.name(), file_of(ckpt, t), dtype.name());
    }
    let mut out = vec![0f32; t.meta.numel()];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK * dtype.size()))
        .try_for_each(|(o, s)| decode_f32_into(dtype, s, o))?;
    if let Some(i) = out.par_iter().position_any(|x| !x.is_finite()) {
        let shape = &t.meta.shape;
        let at = if shape.len() == 2 { format!("[{}, {}]", i / shape[1], i % shape[1]) } else { format!("{i}") };
        bail!(
            "tensor {} in {} holds {} at {at}; lamina will not quantize a weight with NaN or Inf values",
            t.name(),
            file_of(ckpt, t),
            out[i]
        );
    }
    Ok(out)
}

pub fn file_of(ckpt: &Checkpoint, t: &LogicalTensor) -> String {
    ckpt.entry(t.source.stored_name()).map(|(f, _)| f.path.display().to_string()).unwrap_or_else(|| "(missing)".into())
}

/// The byte range a logical tensor reads in its file.
fn range(ckpt: &Checkpoint, t: &LogicalTensor) -> Option<(usize, usize)> {
    let (_, e) = ckpt.entry(t.source.stored_name())?;
    match &t.source {
        Source::Stored(_) | Source::Computed(_) => Some((e.start, e.end)),
        Source::Expert { fused_shape, expert, .. } => {
            let per = fused_shape[1] * fused_shape[2] * e.dtype.size();
            Some((e.start + expert * per, e.start + (expert + 1) * per))
        }
    }
}

/// Gives a tensor's mapped pages back once it is processed.
pub fn release(ckpt: &Checkpoint, t: &LogicalTensor) {
    if let (Some((f, _)), Some((s, e))) = (ckpt.entry(t.source.stored_name()), range(ckpt, t)) {
        f.release(s, e);
    }
}

/// Asks the kernel to read a unit's bytes ahead of use.
pub fn prefetch(ckpt: &Checkpoint, unit: &Unit) {
    for name in &unit.stored {
        if let Some((f, e)) = ckpt.entry(name) {
            f.prefetch(e.start, e.end);
        }
    }
}

/// Checks, before the run, that every tensor the plan reads is present with the planned shape.
pub fn check_inputs(ckpt: &Checkpoint, unit: &Unit) -> Result<()> {
    for t in unit.tensors.iter().filter(|t| !matches!(t.source, Source::Computed(_))) {
        let name = t.source.stored_name();
        let (f, e) = ckpt.require(name)?;
        if let Source::Stored(_) = t.source {
            if e.shape != t.meta.shape || e.dtype != t.meta.dtype {
                bail!("tensor {name} in {} changed since it was planned", f.path.display());
            }
        }
    }
    Ok(())
}
