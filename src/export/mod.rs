//! Output formats: how a quantized linear becomes named tensors, and the files that describe
//! them: msModelSlim's Ascend format ([`ascend`], checked against the Ascend servers' loaders by
//! [`rules`] and [`check`]) and compressed-tensors ([`compressed_tensors`], for vLLM and transformers). The pipeline is format-agnostic; it asks the [`Exporter`] for tensor layouts at plan
//! time and for tensor data at run time, and the two must agree (the writer checks).

pub mod ascend;
pub mod ascend_read;
pub mod check;
pub mod compressed_tensors;
pub mod read;
pub mod rules;

use crate::quant::kv_cache::KvCacheQuant;
use crate::quant::{QuantSpec, QuantizedLinear};
use crate::tensor::{Tensor, TensorMeta};
use anyhow::Result;
use ndarray::ArrayView2;
use std::path::Path;

/// A planned output tensor and the quantization type the description gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutMeta {
    pub meta: TensorMeta,
    pub kind: &'static str,
}

/// An output tensor with its data.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub tensor: Tensor,
    pub kind: &'static str,
}

impl OutTensor {
    pub fn out_meta(&self) -> OutMeta {
        OutMeta { meta: self.tensor.meta(&self.name), kind: self.kind }
    }
}

/// The output formats of `--save_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFormat {
    /// msModelSlim's AscendV1 (vLLM-Ascend, MindIE).
    Ascend,
    /// compressed-tensors (vLLM on GPUs, transformers).
    CompressedTensors,
}

impl SaveFormat {
    pub fn name(self) -> &'static str {
        match self {
            SaveFormat::Ascend => "ascend",
            SaveFormat::CompressedTensors => "compressed-tensors",
        }
    }
    pub fn parse(s: &str) -> Result<SaveFormat> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "ascend" | "ascendv1" | "ascend-v1" | "modelslim" => Ok(SaveFormat::Ascend),
            "compressed-tensors" | "ct" => Ok(SaveFormat::CompressedTensors),
            _ => anyhow::bail!("unknown --save_format {s:?} (ascend, compressed-tensors)"),
        }
    }
}

/// The description kind of tensors kept as they are.
pub const FLOAT: &str = "FLOAT";

pub trait Exporter: Send + Sync {
    /// Refuses, at plan time, a linear the format cannot hold with this scheme (odd shapes, settings its
    /// readers refuse).
    fn check_linear(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize) -> Result<()> {
        let _ = (module, spec, rows, cols);
        Ok(())
    }
    /// The tensors a quantized linear `module` (`rows × cols`, with or without bias) becomes.
    fn linear_layout(&self, module: &str, spec: &QuantSpec, rows: usize, cols: usize, has_bias: bool) -> Vec<OutMeta>;
    /// The same tensors, with data.
    fn linear_tensors(&self, module: &str, q: &QuantizedLinear) -> Vec<OutTensor>;
    /// The tensors the int8 KV cache (C8) of attention module `module` becomes.
    fn kv_cache_layout(&self, module: &str, k_channels: usize, v_channels: usize) -> Vec<OutMeta>;
    /// The same tensors, with data.
    fn kv_cache_tensors(&self, module: &str, q: &KvCacheQuant) -> Vec<OutTensor>;
    /// Name of weights file `k` (0-based) of `n`; `n == 1` is the unsharded name.
    fn weights_file(&self, k: usize, n: usize) -> String;
    /// Name of the shard index.
    fn index_file(&self) -> &'static str;
    /// Whether a file of the save folder is one this format writes (weights, index, metadata files):
    /// `--overwrite` removes them, and a folder holding them without a journal is refused.
    fn is_output_file(&self, name: &str) -> bool;
    /// The files written once every shard is complete, config.json first, in writing order: the last one
    /// marks the output complete. `config` is the checkpoint's config.json; `linears` the quantized linears
    /// and their schemes, in plan order; `float_linears` the linears kept float; `rotation` the rotation `Q`
    /// folded into the model (QuaRot: its hidden states are `h Q`), for formats that record it.
    fn metadata_files(
        &self,
        config: &serde_json::Value,
        outputs: &[OutMeta],
        linears: &[(String, QuantSpec)],
        float_linears: &[String],
        rotation: Option<ArrayView2<f32>>,
    ) -> Result<Vec<(String, Vec<u8>)>>;
    /// The format's name, in the resume fingerprint.
    fn format_name(&self) -> &'static str;
}

/// The checkpoint's config.json without a `quantization_config` (at the top or in `text_config`): a
/// server would otherwise load the output with the source's quantization method.
pub fn config_without_quantization(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("quantization_config");
        if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
            t.remove("quantization_config");
        }
    }
    c
}

/// Pretty JSON with a final newline.
pub fn json_bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v)?;
    b.push(b'\n');
    Ok(b)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let tmp = path.with_file_name(format!(".{}.partial", path.file_name().unwrap().to_string_lossy()));
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("cannot sync {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
