//! Reading logical tensors out of the checkpoint maps, and giving their pages back: bytes, f32
//! values (NaN / Inf refused naming the tensor and its file), read-ahead and release of a unit's
//! pages, and 2D tensors viewed in place as matrices ([`matrix_view`]) for quantization.

use super::fp8::BlockScale;
use super::matrix::{MatrixView, NonFinite};
use super::{moe, LogicalTensor, Source, Unit};
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::SafetensorsFile;
use crate::tensor::{decode_f32_into, DType, Tensor};
use anyhow::{bail, ensure, Result};
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
        // A kept FP8 linear is written dequantized, in the model's float dtype.
        Source::BlockFp8 { .. } => Ok(Tensor::from_f32_as(t.meta.dtype, &t.meta.shape, &f32s(ckpt, t)?)?.bytes),
        Source::Rows { fused, fused_shape, .. } => {
            let (f, e) = ckpt.require(fused)?;
            if e.shape != *fused_shape {
                bail!(
                    "tensor {fused} in {} has shape {:?}, the plan expected {:?}",
                    f.path.display(),
                    e.shape,
                    fused_shape
                );
            }
            let (s, end) = row_range(t, e.start, e.dtype.size()).expect("a row slice");
            Ok(f.bytes(e)[s - e.start..end - e.start].to_vec())
        }
    }
}

/// The byte range (in the file) of a row slice whose stored tensor starts at `start`.
fn row_range(t: &LogicalTensor, start: usize, elem: usize) -> Option<(usize, usize)> {
    match &t.source {
        Source::Rows { fused_shape, start: r0, rows, .. } => {
            let row: usize = fused_shape[1..].iter().product::<usize>() * elem;
            Some((start + r0 * row, start + (r0 + rows) * row))
        }
        _ => None,
    }
}

/// Like [`bytes`], giving a stored tensor's mapped pages back piece by piece as they are copied, so that
/// copying a large kept tensor (an embedding table) never holds it twice.
pub fn take_bytes(ckpt: &Checkpoint, t: &LogicalTensor) -> Result<Vec<u8>> {
    let Source::Stored(name) = &t.source else {
        return bytes(ckpt, t);
    };
    let (f, e) = ckpt.require(name)?;
    const PIECE: usize = 32 << 20;
    let mut out = Vec::with_capacity(e.nbytes());
    for (k, piece) in f.bytes(e).chunks(PIECE).enumerate() {
        out.extend_from_slice(piece);
        let start = e.start + k * PIECE;
        f.release(start, start + piece.len());
    }
    Ok(out)
}

/// The tensor widened to f32, refusing NaN and infinities (which would poison every scale).
pub fn f32s(ckpt: &Checkpoint, t: &LogicalTensor) -> Result<Vec<f32>> {
    let raw;
    let mut out = vec![0f32; t.meta.numel()];
    let src: &[u8] = match &t.source {
        Source::Stored(name) => ckpt.bytes(name)?,
        Source::Computed(_) | Source::Expert { .. } | Source::Rows { .. } => {
            raw = bytes(ckpt, t)?;
            &raw
        }
        Source::BlockFp8 { .. } => {
            let view = matrix_view(ckpt, t)?;
            let cols = view.cols.max(1);
            out.par_chunks_mut(cols * 64).enumerate().for_each(|(b, o)| view.read_rows_into(b * 64, o));
            return finite(ckpt, t, out);
        }
    };
    let dtype = t.meta.dtype;
    if !dtype.is_float() {
        bail!("tensor {} in {} has dtype {}, not a float type", t.name(), file_of(ckpt, t), dtype.name());
    }
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK * dtype.size()))
        .try_for_each(|(o, s)| decode_f32_into(dtype, s, o))?;
    finite(ckpt, t, out)
}

/// `out`, unless it holds a NaN or an infinity.
fn finite(ckpt: &Checkpoint, t: &LogicalTensor, out: Vec<f32>) -> Result<Vec<f32>> {
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

/// A 2D float tensor as a matrix read in place from the map: a stored tensor row-major, an expert's linear
/// at its place in the fused tensor (transposed in the release layout). Nothing is copied.
pub fn matrix_view<'a>(ckpt: &'a Checkpoint, t: &LogicalTensor) -> Result<MatrixView<'a>> {
    let dtype = t.meta.dtype;
    if let Source::BlockFp8 { weight, scale, block } = &t.source {
        let (f, e) = ckpt.require(weight)?;
        let (sf, se) = ckpt.require(scale)?;
        ensure!(
            e.dtype == DType::F8E4M3 && e.shape == t.meta.shape,
            "tensor {weight} in {} is {} {:?}, the plan expected an FP8 weight {:?}",
            f.path.display(),
            e.dtype.name(),
            e.shape,
            t.meta.shape
        );
        let grid_cols = e.shape[1].div_ceil(block[1]);
        ensure!(
            se.shape == [e.shape[0].div_ceil(block[0]), grid_cols],
            "tensor {scale} in {} has shape {:?}, not the block grid of {weight}",
            sf.path.display(),
            se.shape
        );
        let scale = BlockScale { dtype: se.dtype, bytes: sf.bytes(se), block: *block, grid_cols };
        return Ok(MatrixView::block_fp8(f.bytes(e), e.shape[0], e.shape[1], scale));
    }
    if !dtype.is_float() || t.meta.shape.len() != 2 {
        bail!(
            "tensor {} in {} has dtype {} and shape {:?}, not a 2D float matrix",
            t.name(),
            file_of(ckpt, t),
            dtype.name(),
            t.meta.shape
        );
    }
    let (rows, cols) = (t.meta.shape[0], t.meta.shape[1]);
    let (f, e) = ckpt.require(t.source.stored_name())?;
    let bytes = f.bytes(e);
    match &t.source {
        Source::Stored(_) | Source::Computed(_) => Ok(MatrixView::row_major(dtype, bytes, rows, cols)),
        Source::Rows { fused, fused_shape, start, .. } => {
            if e.shape != *fused_shape || e.dtype != dtype || fused_shape.get(1) != Some(&cols) {
                bail!(
                    "tensor {fused} in {} has shape {:?}, the plan expected {:?}",
                    f.path.display(),
                    e.shape,
                    fused_shape
                );
            }
            Ok(MatrixView {
                dtype,
                bytes,
                rows,
                cols,
                offset: start * cols,
                row_stride: cols,
                col_stride: 1,
                scale: None,
            })
        }
        Source::Expert { fused, fused_shape, layout, part, expert } => {
            if e.shape != *fused_shape || e.dtype != dtype {
                bail!(
                    "tensor {fused} in {} has shape {:?}, the plan expected {:?}",
                    f.path.display(),
                    e.shape,
                    fused_shape
                );
            }
            let p = moe::place(fused_shape, *layout, *part, *expert);
            Ok(MatrixView {
                dtype,
                bytes,
                rows,
                cols,
                offset: p.offset,
                row_stride: p.row_stride,
                col_stride: p.col_stride,
                scale: None,
            })
        }
        Source::BlockFp8 { .. } => unreachable!("handled above"),
    }
}

/// The error for a weight holding NaN or Inf.
pub fn non_finite(ckpt: &Checkpoint, t: &LogicalTensor, e: NonFinite) -> anyhow::Error {
    anyhow::anyhow!(
        "tensor {} in {} holds {} at [{}, {}]; lamina will not quantize a weight with NaN or Inf values",
        t.name(),
        file_of(ckpt, t),
        e.value,
        e.row,
        e.col
    )
}

pub fn file_of(ckpt: &Checkpoint, t: &LogicalTensor) -> String {
    ckpt.entry(t.source.stored_name()).map(|(f, _)| f.path.display().to_string()).unwrap_or_else(|| "(missing)".into())
}

/// Where a logical tensor's bytes lie: its stored tensor's file, and the byte range it reads there (for an
/// expert, its expert's whole slice of the fused tensor, which gate and up share in the release layout; for
/// a row slice, its rows).
pub fn span(ckpt: &Checkpoint, t: &LogicalTensor) -> Option<(std::path::PathBuf, usize, usize)> {
    let (f, e) = ckpt.entry(t.source.stored_name())?;
    let (s, end) = match &t.source {
        Source::Stored(_) | Source::Computed(_) | Source::BlockFp8 { .. } => (e.start, e.end),
        Source::Expert { fused_shape, expert, .. } => {
            let per = fused_shape[1] * fused_shape[2] * e.dtype.size();
            (e.start + expert * per, e.start + (expert + 1) * per)
        }
        Source::Rows { .. } => row_range(t, e.start, e.dtype.size())?,
    };
    Some((f.path.clone(), s, end))
}

/// Gives a tensor's mapped pages back once it is processed (an FP8 weight's scale with it).
pub fn release(ckpt: &Checkpoint, t: &LogicalTensor) {
    if let (Some((f, _)), Some((_, s, e))) = (ckpt.entry(t.source.stored_name()), span(ckpt, t)) {
        f.release(s, e);
    }
    if let Source::BlockFp8 { scale, .. } = &t.source {
        if let Some((f, e)) = ckpt.entry(scale) {
            f.release(e.start, e.end);
        }
    }
}

/// Asks the kernel to read a unit's bytes ahead of use. One `WILLNEED` reads at most the device's
/// read-ahead window (`read_ahead_kb`, often 128 KiB to 8 MiB) and ignores the rest of its range, so the
/// range is advised piece by piece: each call queues its piece and returns, and the disk streams the
/// whole unit while earlier units are computed.
pub fn prefetch(ckpt: &Checkpoint, unit: &Unit) {
    for (f, s, e) in unit_ranges(ckpt, unit) {
        for p in (s..e).step_by(PREFETCH_PIECE) {
            f.prefetch(p, (p + PREFETCH_PIECE).min(e));
        }
    }
}

const PREFETCH_PIECE: usize = 2 << 20;

/// The byte ranges a unit reads, in file order.
fn unit_ranges<'a>(ckpt: &'a Checkpoint, unit: &Unit) -> Vec<(&'a std::sync::Arc<SafetensorsFile>, usize, usize)> {
    let mut ranges: Vec<_> =
        unit.stored.iter().filter_map(|name| ckpt.entry(name)).map(|(f, e)| (f, e.start, e.end)).collect();
    ranges.sort_by(|a, b| (&a.0.path, a.1).cmp(&(&b.0.path, b.1)));
    ranges
}

/// The reader stage: asks the kernel to read `units` in order ([`prefetch`]'s pieces), staying at most
/// `window` bytes ahead of the work, which is measured by the bytes it has given back
/// ([`Checkpoint::released_bytes`]). So a checkpoint of any size streams from the disk while the
/// page cache holds only the window, and the work finds its bytes in memory. Returns when everything
/// is requested or `stop` is set.
pub fn read_ahead<'a>(
    ckpt: &Checkpoint,
    units: impl Iterator<Item = &'a Unit>,
    window: u64,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    if window == 0 {
        return;
    }
    let released_at_start = ckpt.released_bytes();
    let mut requested = 0u64;
    for unit in units {
        for (f, s, e) in unit_ranges(ckpt, unit) {
            for p in (s..e).step_by(PREFETCH_PIECE) {
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let done = ckpt.released_bytes().saturating_sub(released_at_start);
                    if requested < done + window {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                let end = (p + PREFETCH_PIECE).min(e);
                f.prefetch(p, end);
                requested += (end - p) as u64;
            }
        }
    }
}

/// Checks, before the run, that every tensor the plan reads is present with the planned shape.
pub fn check_inputs(ckpt: &Checkpoint, unit: &Unit) -> Result<()> {
    for t in unit.tensors.iter().filter(|t| !matches!(t.source, Source::Computed(_))) {
        let name = t.source.stored_name();
        let (f, e) = ckpt.require(name)?;
        match &t.source {
            Source::Stored(_) if e.shape != t.meta.shape || e.dtype != t.meta.dtype => {
                bail!("tensor {name} in {} changed since it was planned", f.path.display());
            }
            Source::BlockFp8 { .. } => {
                matrix_view(ckpt, t)?;
            }
            _ => {}
        }
    }
    Ok(())
}
