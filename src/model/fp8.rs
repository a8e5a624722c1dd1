//! FP8 block-quantized checkpoints: DeepSeek-V3 / R1 as released, and the FP8 releases of other
//! families (Qwen3, Qwen3-VL), which use the same scheme.
//!
//! Such a checkpoint stores a linear's weight `W [rows, cols]` as `float8_e4m3fn` (`X.weight`,
//! dtype `F8_E4M3`) and beside it `X.weight_scale_inv` (f32, or bf16) with one value per block of
//! `quantization_config.weight_block_size` = `[block_rows, block_cols]` (128 × 128 in the releases):
//!
//! ```text
//! W[r, c] = fp8[r, c] · weight_scale_inv[r / block_rows, c / block_cols]
//! ```
//!
//! The grid is `[ceil(rows / block_rows), ceil(cols / block_cols)]`: the last block of a row or a
//! column may be partial (the 576 rows of `kv_a_proj_with_mqa` are 4.5 blocks). ("inv" because
//! the training side divides by it; a reader multiplies.)
//!
//! lamina never holds a dequantized copy of more than what a unit is working on: the pipeline sees
//! such a weight as a logical tensor of the model's float dtype whose source is
//! [`crate::model::Source::BlockFp8`], and every reader (the data-free quantizer's matrix view, the
//! calibration's f32 widening, a kept float tensor's bytes) multiplies by the block scale as it
//! decodes. The scale tensors are consumed: they are never written to the output, and a linear kept
//! float is written dequantized in the model's float dtype, so the output's `config.json` carries no
//! `quantization_config`.

use super::TensorError;
use crate::tensor::{DType, TensorMeta};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// The suffix of a weight's block scale, replacing `weight`.
pub const SCALE_SUFFIX: &str = "weight_scale_inv";

/// `quantization_config` of an FP8 block-quantized checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Config {
    /// `weight_block_size`: rows and columns of one scale block.
    pub block: [usize; 2],
}

impl Fp8Config {
    /// Reads `quantization_config` (top level, or in `text_config`). `None` when there is none.
    /// A block size that is missing or malformed is an error only when FP8 tensors need it
    /// ([`pair_scales`]); a quantization method lamina cannot read (GPTQ, AWQ, compressed-tensors,
    /// bitsandbytes) is refused here, since its integer tensors would otherwise be copied as if
    /// they were plain weights.
    pub fn from_config(config: &Value) -> Result<Option<BlockSize>> {
        let q = config
            .get("quantization_config")
            .or_else(|| config.get("text_config").and_then(|t| t.get("quantization_config")))
            .filter(|q| !q.is_null());
        let Some(q) = q else { return Ok(None) };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "fp8" {
            bail!(
                "config.json: quantization_config has quant_method {method:?}; lamina reads float checkpoints \
                 and FP8 block-quantized ones (quant_method \"fp8\" with weight_block_size), not already \
                 quantized {method} weights. Start from the float (or FP8) release of the model"
            );
        }
        if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
            ensure!(fmt == "e4m3", "config.json: quantization_config.fmt is {fmt:?}; lamina reads FP8 e4m3 weights");
        }
        let block = match q.get("weight_block_size") {
            None | Some(Value::Null) => Err("config.json: quantization_config (quant_method fp8) has no \
                 weight_block_size, so the FP8 weights' block scales cannot be placed (the releases say [128, 128])"
                .to_string()),
            Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|x| x.as_u64().is_some_and(|n| n > 0)) => {
                Ok(Fp8Config { block: [a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize] })
            }
            Some(v) => Err(format!(
                "config.json: quantization_config.weight_block_size is {v}; expected two positive integers \
                 [block_rows, block_cols]"
            )),
        };
        Ok(Some(block))
    }

    /// The scale grid of a `rows × cols` weight: `[ceil(rows / block_rows), ceil(cols / block_cols)]`.
    pub fn grid(&self, rows: usize, cols: usize) -> [usize; 2] {
        [rows.div_ceil(self.block[0]), cols.div_ceil(self.block[1])]
    }
}

/// The block size of config.json, or why it cannot be read (an error only if FP8 tensors need it).
pub type BlockSize = std::result::Result<Fp8Config, String>;

/// An FP8 weight and its scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Weight {
    pub scale: String,
    pub block: [usize; 2],
}

/// The FP8 weights of a checkpoint, each with its scale, and the scales they consume.
#[derive(Debug, Clone, Default)]
pub struct Fp8Pairs {
    pub weights: BTreeMap<String, Fp8Weight>,
    pub scales: BTreeSet<String>,
}

/// Pairs every `F8_E4M3` tensor with its `weight_scale_inv` and checks the scale's grid. Errors name
/// the tensor: an FP8 tensor without its scale, a scale of the wrong grid or dtype, FP8 tensors
/// without a block size in config.json, a scale without an FP8 weight, an FP8 tensor that is not
/// a 2D `.weight`.
pub fn pair_scales(config: Option<&BlockSize>, inventory: &[TensorMeta]) -> Result<Fp8Pairs> {
    let by_name: BTreeMap<&str, &TensorMeta> = inventory.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut pairs = Fp8Pairs::default();
    for t in inventory.iter().filter(|t| t.dtype == DType::F8E4M3) {
        let w = pair_one(config, t, &by_name).map_err(|e| TensorError::new(&t.name, e))?;
        pairs.scales.insert(w.scale.clone());
        pairs.weights.insert(t.name.clone(), w);
    }
    for t in inventory.iter().filter(|t| t.name.ends_with(&format!(".{SCALE_SUFFIX}"))) {
        if !pairs.scales.contains(&t.name) {
            let weight = format!("{}weight", t.name.strip_suffix(SCALE_SUFFIX).unwrap());
            let msg = format!(
                "tensor {} is a block scale, but {weight} is not an FP8 (F8_E4M3) weight{}; a checkpoint \
                 converted to bf16 should not keep its scales",
                t.name,
                by_name.get(weight.as_str()).map(|w| format!(" (it is {})", w.dtype.name())).unwrap_or_default()
            );
            return Err(TensorError::new(&t.name, anyhow::anyhow!(msg)).into());
        }
    }
    Ok(pairs)
}

/// Pairs one FP8 weight with its scale and checks the scale's grid and dtype.
fn pair_one(config: Option<&BlockSize>, t: &TensorMeta, by_name: &BTreeMap<&str, &TensorMeta>) -> Result<Fp8Weight> {
    let module = t.name.strip_suffix(".weight").filter(|_| t.shape.len() == 2).with_context(|| {
        format!(
            "tensor {} is FP8 (F8_E4M3) with shape {:?}; lamina reads FP8 only as the 2D weights of \
             linear layers with block scales",
            t.name, t.shape
        )
    })?;
    let cfg = match config {
        Some(Ok(c)) => c,
        Some(Err(e)) => bail!("tensor {} is FP8 (F8_E4M3): {e}", t.name),
        None => bail!(
            "tensor {} is FP8 (F8_E4M3) but config.json has no quantization_config with a \
             weight_block_size, so its block scales cannot be placed",
            t.name
        ),
    };
    let scale_name = format!("{module}.{SCALE_SUFFIX}");
    let scale = by_name.get(scale_name.as_str()).with_context(|| {
        format!("tensor {} is FP8 (F8_E4M3) but its block scale {scale_name} is missing from the checkpoint", t.name)
    })?;
    let grid = cfg.grid(t.shape[0], t.shape[1]);
    ensure!(
        matches!(scale.dtype, DType::F32 | DType::BF16 | DType::F16),
        "tensor {scale_name} (the block scale of {}) has dtype {}, expected F32",
        t.name,
        scale.dtype.name()
    );
    ensure!(
        scale.shape == grid,
        "tensor {scale_name} has shape {:?}, but the FP8 weight {} {:?} in blocks of {:?} \
         (quantization_config.weight_block_size) needs a scale grid of {:?}",
        scale.shape,
        t.name,
        t.shape,
        cfg.block,
        grid
    );
    Ok(Fp8Weight { scale: scale_name, block: cfg.block })
}

/// The dtype a dequantized FP8 weight takes: config.json's `torch_dtype` (or `dtype`) when it is a
/// float type, else bf16.
pub fn float_dtype(config: &Value) -> DType {
    let d = config
        .get("torch_dtype")
        .or_else(|| config.get("dtype"))
        .or_else(|| config.get("text_config").and_then(|t| t.get("torch_dtype").or_else(|| t.get("dtype"))))
        .and_then(|v| v.as_str());
    match d {
        Some("float16") => DType::F16,
        Some("float32") => DType::F32,
        _ => DType::BF16,
    }
}

/// Where an FP8 weight's scales are: `weight[r, c]` is multiplied by `scale[r / block[0], c / block[1]]`,
/// read from the scale tensor's bytes (`[grid_rows, grid_cols]`, row-major).
#[derive(Debug, Clone, Copy)]
pub struct BlockScale<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub block: [usize; 2],
    pub grid_cols: usize,
}

impl BlockScale<'_> {
    /// The scale of block `(br, bc)`.
    pub fn at(&self, br: usize, bc: usize) -> f32 {
        let i = br * self.grid_cols + bc;
        let s = self.dtype.size();
        let mut v = [0f32];
        crate::tensor::decode_f32_into(self.dtype, &self.bytes[i * s..(i + 1) * s], &mut v)
            .expect("block scales are float (checked when paired)");
        v[0]
    }

    /// Decodes row `row` of the FP8 weight from its bytes (all its columns) into `out`, each value times
    /// its block's scale: the same values as widening the bytes and then [`Self::apply_row`], in one pass.
    pub fn decode_row(&self, row: usize, bytes: &[u8], out: &mut [f32]) {
        let table = crate::tensor::f8e4m3_table();
        let (br, bc) = (row / self.block[0], self.block[1]);
        for (k, (o, b)) in out.chunks_mut(bc).zip(bytes.chunks(bc)).enumerate() {
            let s = self.at(br, k);
            for (o, &b) in o.iter_mut().zip(b) {
                *o = table[b as usize] * s;
            }
        }
    }

    /// Multiplies `values`, the raw FP8 values of row `row` at columns `col0..`, by their blocks' scales.
    pub fn apply_row(&self, row: usize, col0: usize, values: &mut [f32]) {
        let (br, bc) = (row / self.block[0], self.block[1]);
        let mut c = col0;
        let mut rest = values;
        while !rest.is_empty() {
            let n = (bc - c % bc).min(rest.len());
            let s = self.at(br, c / bc);
            let (head, tail) = rest.split_at_mut(n);
            head.iter_mut().for_each(|v| *v *= s);
            rest = tail;
            c += n;
        }
    }

    /// Multiplies `values`, the raw FP8 values of column `col` at rows `row0..`, by their blocks' scales.
    pub fn apply_column(&self, col: usize, row0: usize, values: &mut [f32]) {
        let (bc, br) = (col / self.block[1], self.block[0]);
        let mut r = row0;
        let mut rest = values;
        while !rest.is_empty() {
            let n = (br - r % br).min(rest.len());
            let s = self.at(r / br, bc);
            let (head, tail) = rest.split_at_mut(n);
            head.iter_mut().for_each(|v| *v *= s);
            rest = tail;
            r += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(name: &str, dtype: DType, shape: &[usize]) -> TensorMeta {
        TensorMeta::new(name, dtype, shape)
    }

    #[test]
    fn config_and_grid() {
        let c = json!({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}});
        let cfg = Fp8Config::from_config(&c).unwrap().unwrap().unwrap();
        // kv_a_proj_with_mqa of DeepSeek-V3: 576 rows are 4.5 blocks.
        assert_eq!(cfg.grid(576, 7168), [5, 56]);
        assert_eq!(cfg.grid(128, 128), [1, 1]);
        assert!(Fp8Config::from_config(&json!({})).unwrap().is_none());
        let gptq = json!({"quantization_config": {"quant_method": "gptq", "bits": 4}});
        assert!(Fp8Config::from_config(&gptq).unwrap_err().to_string().contains("gptq"));
        let no_block = json!({"quantization_config": {"quant_method": "fp8"}});
        let e = Fp8Config::from_config(&no_block).unwrap().unwrap().unwrap_err().to_string();
        assert!(e.contains("weight_block_size"), "{e}");
    }

    #[test]
    fn scales_pair_with_their_weights_and_bad_grids_are_named() {
        let cfg: BlockSize = Ok(Fp8Config { block: [128, 128] });
        let w = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight";
        let s = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv";
        let good = [meta(w, DType::F8E4M3, &[576, 7168]), meta(s, DType::F32, &[5, 56])];
        let p = pair_scales(Some(&cfg), &good).unwrap();
        assert_eq!(p.weights[w], Fp8Weight { scale: s.into(), block: [128, 128] });
        assert!(p.scales.contains(s));

        let e = pair_scales(Some(&cfg), &good[..1]).unwrap_err().to_string();
        assert!(e.contains(w) && e.contains(s) && e.contains("missing"), "{e}");
        let wrong = [meta(w, DType::F8E4M3, &[576, 7168]), meta(s, DType::F32, &[4, 56])];
        let e = pair_scales(Some(&cfg), &wrong).unwrap_err().to_string();
        assert!(e.contains(s) && e.contains("[5, 56]") && e.contains("[4, 56]"), "{e}");
        let e = pair_scales(None, &good).unwrap_err().to_string();
        assert!(e.contains(w) && e.contains("weight_block_size"), "{e}");
        let no_block: BlockSize =
            Err("config.json: quantization_config (quant_method fp8) has no weight_block_size".into());
        let e = pair_scales(Some(&no_block), &good).unwrap_err().to_string();
        assert!(e.contains(w) && e.contains("weight_block_size"), "{e}");
        let orphan = [meta(w, DType::BF16, &[576, 7168]), meta(s, DType::F32, &[5, 56])];
        let e = pair_scales(Some(&cfg), &orphan).unwrap_err().to_string();
        assert!(e.contains(s) && e.contains("BF16"), "{e}");
    }

    #[test]
    fn block_scales_apply_to_ragged_edges() {
        // A 3 × 5 weight in blocks of 2 × 2: grid 2 × 3, scales 1..6.
        let scales: Vec<u8> = (1..=6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let b = BlockScale { dtype: DType::F32, bytes: &scales, block: [2, 2], grid_cols: 3 };
        let mut row = [1f32; 5];
        b.apply_row(2, 0, &mut row);
        assert_eq!(row, [4.0, 4.0, 5.0, 5.0, 6.0]);
        let mut tail = [1f32; 2];
        b.apply_row(1, 3, &mut tail);
        assert_eq!(tail, [2.0, 3.0]);
        let mut col = [1f32; 3];
        b.apply_column(4, 0, &mut col);
        assert_eq!(col, [3.0, 3.0, 6.0]);
    }

    /// The one-pass row decode gives, for every byte value, the textbook E4M3 value times its block's scale
    /// (NaN where the byte is NaN), on a row whose last block is partial.
    #[test]
    fn rows_decode_with_their_block_scales() {
        let (rows, cols) = (3, 300); // blocks of 2 × 128: grid 2 × 3, the last column block 44 wide
        let scales: Vec<f32> = vec![0.5, 3.0, -0.25, 1e-3, 7.0, 2.0];
        let sb: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let b = BlockScale { dtype: DType::F32, bytes: &sb, block: [2, 128], grid_cols: 3 };
        let bytes: Vec<u8> = (0..rows * cols).map(|i| (i * 7 % 256) as u8).collect();
        for r in 0..rows {
            let mut out = vec![0f32; cols];
            b.decode_row(r, &bytes[r * cols..(r + 1) * cols], &mut out);
            for (c, &v) in out.iter().enumerate() {
                let want = crate::tensor::f8e4m3_value(bytes[r * cols + c]) * scales[(r / 2) * 3 + c / 128];
                assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "({r}, {c}): {v} vs {want}");
            }
        }
    }
}
