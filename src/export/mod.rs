//! Output formats: how a quantized linear becomes named tensors, and the files that describe
//! them. The pipeline is format-agnostic; it asks the [`Exporter`] for tensor layouts at plan
//! time and for tensor data at run time, and the two must agree (the writer checks).

pub mod ascend;
pub mod ascend_read;
pub mod check;
pub mod rules;

use crate::quant::{QuantSpec, QuantizedLinear};
use crate::tensor::{Tensor, TensorMeta};
use anyhow::Result;
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
    /// Name of weights file `k` (0-based) of `n`; `n == 1` is the unsharded name.
    fn weights_file(&self, k: usize, n: usize) -> String;
    /// Name of the shard index.
    fn index_file(&self) -> &'static str;
    /// Metadata files written once every shard is complete: (file name, bytes). `specs` are the schemes of
    /// the quantized linears, in plan order.
    fn metadata_files(&self, outputs: &[OutMeta], specs: &[QuantSpec]) -> Result<Vec<(String, Vec<u8>)>>;
    /// Rewrites the model's config.json for the output folder.
    fn output_config(&self, config: &serde_json::Value) -> serde_json::Value;
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
