//! `W4A16`: int4 weights in groups of input channels, activations in float.
//!
//! msModelSlim's v1 saver has no W4A16 writer (its older `llm_ptq` saver packed int4 into int8 with
//! `_w4a16_pack_int4`), and the one loader that reads `W4A16` from a `quant_model_description.json` today is
//! vLLM-Ascend's `AscendW4A16FusedMoEMethod` (`quantization/methods/w4a16.py`). lamina writes what that loader
//! reads, for a linear `X` of `out × in` with groups of `g` input channels:
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `X.weight_packed` | int32 | `[out, in/8]` | eight int4 per word along the input: element `c` of a row is `q + 8` (0..15) in bits `4·(c % 8)` of word `c / 8` |
//! | `X.weight_scale` | f32 | `[out, ceil(in/g)]` | symmetric scale of each group, `w ≈ q · s` |
//! | `X.weight_shape` | int32 | `[2]` | `[out, in]` |
//! | `X.bias` | f32 | `[out]` | `FLOAT`, when the linear has one |
//!
//! and the global `group_size` key of the description says `g`. The loader unpacks with `unpack_from_int32`
//! (`(word >> 4i) & 0xF` minus 8, `packed_dim = 1`), fuses `gate_proj`/`up_proj` into `w13`, transposes to the
//! kernel's `[in, out]` and repacks; it builds zero offsets itself (symmetric weights), so no `weight_offset`
//! is written. It maps the description's `X.weight_packed` key to `X.weight` when it looks a layer's type up.
//! Scales are stored as f32; the loader copies them into parameters of the model's dtype.
//!
//! Limits of that reader, which lamina's rules enforce ([`crate::export::rules`]): vLLM-Ascend reads W4A16
//! only for MoE experts (a dense linear of type W4A16 is refused there; MindIE reads it), and it asserts the
//! hidden and intermediate sizes divisible by 8 and by `g`. The format itself needs `in` to be a multiple
//! of 8 (the packing) and lets the last group of a row be shorter when `in` is not a multiple of `g`.

use crate::export::OutTensor;
use crate::quant::QuantizedWeight;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};

pub const KIND: &str = "W4A16";

/// int4 values per int32 word.
pub const PER_WORD: usize = 8;

pub fn check(module: &str, cols: usize) -> Result<()> {
    if cols % PER_WORD != 0 {
        bail!("{module}: W4A16 packs {PER_WORD} int4 per int32 along the input, but the weight has {cols} inputs");
    }
    Ok(())
}

pub fn tensors(module: &str, w: &QuantizedWeight) -> Vec<OutTensor> {
    let (rows, cols) = (w.rows, w.cols);
    let t = |suffix: &str, tensor| OutTensor { name: format!("{module}.{suffix}"), tensor, kind: KIND };
    vec![
        t("weight_packed", Tensor::from_bytes(DType::I32, &[rows, cols / PER_WORD], pack_int32(&w.q))),
        t("weight_scale", Tensor::from_f32(&[rows, w.groups()], &w.scale)),
        t("weight_shape", Tensor::from_i32(&[2], &[rows as i32, cols as i32])),
    ]
}

/// Packs int4 values (row-major, a multiple of 8 per row) eight to a little-endian int32 word, lowest bits
/// first, each offset by 8 to 0..15.
pub fn pack_int32(q: &[i8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.len() / 2);
    for eight in q.chunks_exact(PER_WORD) {
        let word = eight.iter().enumerate().fold(0u32, |acc, (i, &v)| acc | (((v as i32 + 8) as u32 & 0xF) << (4 * i)));
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{rtn, QuantSpec};

    /// vLLM-Ascend's `unpack_from_int32(weight, shape, 4, packed_dim=1)`, written out.
    fn unpack(words: &[i32], rows: usize, cols: usize) -> Vec<i8> {
        let mut q = vec![0i8; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let w = words[r * (cols / 8) + c / 8];
                q[r * cols + c] = (((w >> (4 * (c % 8))) & 0xF) - 8) as i8;
            }
        }
        q
    }

    #[test]
    fn packing_recovers_every_int4_value() {
        let (rows, cols) = (3, 256);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 307) as f32 - 150.0) / 40.0).collect();
        let qw = rtn::quantize(&w, rows, cols, &QuantSpec::preset("w4a16").unwrap());
        let ts = tensors("m", &qw);
        let packed = &ts[0].tensor;
        assert_eq!((packed.dtype, packed.shape.clone()), (DType::I32, vec![3, 32]));
        let words: Vec<i32> = packed.to_i64().unwrap().iter().map(|&x| x as i32).collect();
        assert_eq!(unpack(&words, rows, cols), qw.q);
        assert_eq!(ts[1].tensor.shape, vec![3, 2]);
        assert_eq!(ts[2].tensor.to_i64().unwrap(), vec![3, 256]);
        // The whole int4 range, including -8, survives.
        let all: Vec<i8> = (-8..8).collect();
        let words: Vec<i32> = pack_int32(&all).chunks(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(unpack(&words, 1, 16), all);
        // A known word: 0..8 offset by 8 are the nibbles 8..15, lowest first.
        assert_eq!(pack_int32(&[0, 1, 2, 3, 4, 5, 6, 7]), 0xFEDC_BA98u32.to_le_bytes());
    }

    #[test]
    fn refuses_inputs_that_do_not_fill_words() {
        assert!(check("m", 36).unwrap_err().to_string().contains("36 inputs"));
        assert!(check("m", 40).is_ok());
    }
}
