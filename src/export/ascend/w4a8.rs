//! `W4A8_DYNAMIC`: int4 weights per output channel, int8 activations per token at run time.
//!
//! What lamina writes for a linear `X` of `out × in` (msModelSlim v1's `AscendV1Saver.on_w4a8_dynamic`
//! with `save/utils/pack.py`):
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `X.weight` | int8 | `[out/2, in]` | two int4 of adjacent output rows per byte: `q[2r, c]` in the low nibble, `q[2r+1, c]` in the high one (`w4a8_pack_int4`) |
//! | `X.weight_scale` | f32 | `[out, 1]` | symmetric per-channel scale, `w ≈ q · s` |
//! | `X.weight_offset` | f32 | `[out, 1]` | zeros |
//! | `X.scale_bias` | f32 | `[out, 1]`, or `[out, 16]` for `o_proj` / `down_proj` / `w2` | `8 · Σ q·s` over the row, or over each of 16 equal slices of the input (`process_scale(name, deq_weight, tp_num=16)`) |
//! | `X.bias` | f32 | `[out]` | `FLOAT`, when the linear has one |
//!
//! The reader is vLLM-Ascend's `AscendW4A8DynamicFusedMoEMethod` (`quantization/methods/w4a8.py`, msModelSlim
//! path): it loads expert `gate_proj`/`up_proj` weights as `[inter/2, hidden]` and `down_proj` as
//! `[hidden/2, inter]`, transposes them to `[in, out/2]` and reinterprets four bytes as one int32 for the
//! grouped-matmul kernel, which reads each byte as two unsigned nibbles and corrects with `scale_bias` (hence
//! the factor 8). Row-parallel `down_proj` keeps 16 partial sums so that each of up to 16 tensor-parallel ranks
//! can take its slice of columns and sum it (`16 // tp_size` columns per rank). Only per-channel weights are
//! read: the loader refuses `group_size > 0`, so lamina refuses per-group W4A8.
//!
//! Differences from msModelSlim, both where it writes something no loader reads: msModelSlim recognises the
//! row-parallel names by substring and, for names it recognises as neither kind (vision `qkv`, `proj`,
//! `linear_fc1`), writes the whole dequantized `[out, in]` matrix as `scale_bias`; lamina writes the `[out, 1]`
//! row sum there. The row sums are computed from the integers exactly (`8 · s · Σq`) rather than by summing
//! `q · s` in f32, which differs from msModelSlim only in the last bits.

use crate::export::rules::{is_row_parallel, TP_SLICES};
use crate::export::OutTensor;
use crate::quant::QuantizedWeight;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub const KIND: &str = "W4A8_DYNAMIC";

fn scale_bias_cols(module: &str) -> usize {
    if is_row_parallel(module) {
        TP_SLICES
    } else {
        1
    }
}

/// Refuses shapes and settings the format cannot hold.
pub fn check(module: &str, group_size: Option<usize>, rows: usize, cols: usize) -> Result<()> {
    if group_size.is_some() {
        bail!("{module}: W4A8_DYNAMIC is written per output channel only (vLLM-Ascend refuses per-group W4A8); use scope per_channel");
    }
    if rows % 2 != 0 {
        bail!("{module}: W4A8_DYNAMIC packs pairs of output rows, but the weight has {rows} rows");
    }
    if is_row_parallel(module) && cols % TP_SLICES != 0 {
        bail!(
            "{module}: W4A8_DYNAMIC keeps {TP_SLICES} partial sums of a row-parallel layer's inputs, but it has {cols} inputs"
        );
    }
    Ok(())
}

pub fn tensors(module: &str, w: &QuantizedWeight) -> Vec<OutTensor> {
    let (rows, cols) = (w.rows, w.cols);
    let t = |suffix: &str, tensor| OutTensor { name: format!("{module}.{suffix}"), tensor, kind: KIND };
    let slices = scale_bias_cols(module);
    vec![
        t("weight", Tensor::from_bytes(DType::I8, &[rows / 2, cols], pack_row_pairs(&w.q, rows, cols))),
        t("weight_scale", Tensor::from_f32(&[rows, 1], &w.scale)),
        t("weight_offset", Tensor::from_f32(&[rows, 1], &vec![0.0; rows])),
        t("scale_bias", Tensor::from_f32(&[rows, slices], &scale_bias(&w.q, &w.scale, rows, cols, slices))),
    ]
}

/// `packed[r, c] = q[2r, c] & 0xF | q[2r+1, c] << 4`, shape `[rows/2, cols]`.
pub fn pack_row_pairs(q: &[i8], rows: usize, cols: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows / 2 * cols];
    for (r, dst) in out.chunks_exact_mut(cols).enumerate() {
        let (even, odd) = (&q[2 * r * cols..(2 * r + 1) * cols], &q[(2 * r + 1) * cols..(2 * r + 2) * cols]);
        for ((d, &lo), &hi) in dst.iter_mut().zip(even).zip(odd) {
            *d = (lo as u8 & 0x0F) | ((hi as u8) << 4);
        }
    }
    out
}

/// `8 · s[r] · Σ q[r, c]` over each of `slices` equal runs of columns, `[rows, slices]`.
pub fn scale_bias(q: &[i8], scale: &[f32], rows: usize, cols: usize, slices: usize) -> Vec<f32> {
    let per = cols / slices;
    let mut out = Vec::with_capacity(rows * slices);
    for r in 0..rows {
        for j in 0..slices {
            let sum: i64 = q[r * cols + j * per..r * cols + (j + 1) * per].iter().map(|&x| x as i64).sum();
            out.push((8.0 * scale[r] as f64 * sum as f64) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn, QuantSpec};

    fn sample(rows: usize, cols: usize) -> (Vec<f32>, QuantizedWeight) {
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 211) as f32 - 105.0) / 50.0).collect();
        let q = rtn::quantize(&w, rows, cols, &QuantSpec::preset("w4a8_dynamic").unwrap());
        (w, q)
    }

    /// Reads the packed bytes back as msModelSlim's `_pack_int4` defines them, nibble by nibble.
    fn unpack(bytes: &[u8], rows: usize, cols: usize) -> Vec<i8> {
        let nibble = |b: u8| if b >= 8 { b as i8 - 16 } else { b as i8 };
        let mut q = vec![0i8; rows * cols];
        for r in 0..rows / 2 {
            for c in 0..cols {
                let b = bytes[r * cols + c];
                q[2 * r * cols + c] = nibble(b & 0x0F);
                q[(2 * r + 1) * cols + c] = nibble(b >> 4);
            }
        }
        q
    }

    #[test]
    fn packing_recovers_every_int4_value() {
        let (_, qw) = sample(6, 40);
        assert!(qw.q.iter().any(|&x| x < 0) && qw.q.iter().any(|&x| x == 7 || x == -7));
        let ts = tensors("m.up_proj", &qw);
        assert_eq!(ts[0].tensor.shape, vec![3, 40]);
        assert_eq!(unpack(&ts[0].tensor.bytes, 6, 40), qw.q);
        // Every value of the int4 range, including -8, survives.
        let all: Vec<i8> = (-8..8).chain((-8..8).rev()).collect();
        assert_eq!(unpack(&pack_row_pairs(&all, 2, 16), 2, 16), all);
    }

    #[test]
    fn scale_bias_is_eight_times_the_dequantized_sums() {
        for (module, slices) in [("l.mlp.experts.3.gate_proj", 1), ("l.self_attn.o_proj", 16), ("l.mlp.down_proj", 16)]
        {
            let (_, qw) = sample(4, 64);
            let ts = tensors(module, &qw);
            let sb = ts.iter().find(|t| t.name.ends_with("scale_bias")).unwrap();
            assert_eq!(sb.tensor.shape, vec![4, slices]);
            let got = sb.tensor.to_f32().unwrap();
            let deq = qw.dequantize();
            let per = 64 / slices;
            for r in 0..4 {
                for j in 0..slices {
                    let want: f32 = 8.0 * deq[r * 64 + j * per..r * 64 + (j + 1) * per].iter().sum::<f32>();
                    assert!((got[r * slices + j] - want).abs() <= 1e-4 * (1.0 + want.abs()), "{module} {r} {j}");
                }
            }
            // The 16 slices of a row-parallel layer add up to the whole row's sum.
            if slices == 16 {
                let row0: f32 = got[..16].iter().sum();
                let whole: f32 = 8.0 * deq[..64].iter().sum::<f32>();
                assert!((row0 - whole).abs() <= 1e-4 * (1.0 + whole.abs()));
            }
        }
    }

    #[test]
    fn refuses_what_the_format_cannot_hold() {
        assert!(check("a.q_proj", None, 7, 64).unwrap_err().to_string().contains("pairs"));
        assert!(check("a.o_proj", None, 8, 40).unwrap_err().to_string().contains("16"));
        assert!(check("a.q_proj", Some(128), 8, 256).unwrap_err().to_string().contains("per output channel"));
        assert!(check("a.q_proj", None, 8, 40).is_ok());
    }
}
