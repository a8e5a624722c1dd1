//! One `.safetensors` file, memory-mapped and validated before any byte of it is trusted.
//!
//! The header is checked tensor by tensor so that every error names the file and the tensor:
//! a truncated file, a header whose length or offsets point outside the file, overlapping
//! tensors, a byte count that does not match dtype × shape, or a dtype lamina does not read.

use crate::tensor::{DType, Tensor, TensorMeta};
use anyhow::{bail, Context, Result};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where one tensor lives in its file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn meta(&self) -> TensorMeta {
        TensorMeta::new(&self.name, self.dtype, &self.shape)
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.start
    }
}

pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    /// Sorted by offset.
    pub tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
    /// Bytes given back with [`SafetensorsFile::release`] so far: how far the work has got, for
    /// the reader that keeps a bounded distance ahead of it.
    released: AtomicU64,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetensorsFile({})", self.path.display())
    }
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; lamina never writes to its inputs. A file truncated by
        // another process while mapped would fault, as with any memory-mapped reader.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
        let tensors =
            parse_header(&mmap).with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, tensors, by_name, released: AtomicU64::new(0) })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.position(name).map(|i| &self.tensors[i])
    }

    /// The tensor's place in `tensors`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The tensor's bytes, borrowed from the map (zero-copy).
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        &self.mmap[entry.start..entry.end]
    }

    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// Asks the kernel to start reading a range ahead of use.
    pub fn prefetch(&self, start: usize, end: usize) {
        if end > start {
            let _ = self.mmap.advise_range(Advice::WillNeed, start, end - start);
        }
    }

    /// Drops a range's pages from this process: they are clean file pages and are read again
    /// from the file if touched later.
    pub fn release(&self, start: usize, end: usize) {
        if end > start {
            // SAFETY: the map is private and read-only, so DONTNEED only drops clean pages that
            // the kernel re-reads from the file on the next access; no data can be lost.
            let _ = unsafe { self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
            self.released.fetch_add((end - start) as u64, Ordering::Relaxed);
        }
    }

    /// Bytes given back so far (a range given back twice counts twice).
    pub fn released_bytes(&self) -> u64 {
        self.released.load(Ordering::Relaxed)
    }
}

/// Reads every tensor of a (small) safetensors file into memory: references, inputs files.
pub fn load_all(path: &Path) -> Result<std::collections::BTreeMap<String, Tensor>> {
    let f = SafetensorsFile::open(path)?;
    Ok(f.tensors.iter().map(|e| (e.name.clone(), Tensor::from_bytes(e.dtype, &e.shape, f.bytes(e).to_vec()))).collect())
}

/// Writes tensors to one safetensors file (through a temporary name), wider dtypes first so
/// every tensor is aligned.
pub fn save(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let metas: Vec<TensorMeta> = tensors.iter().map(|(n, t)| t.meta(n)).collect();
    let layout = crate::io::shards::ShardLayout::plan(&metas, None, &|_, _| String::new())?;
    let file = &layout.files[0];
    let mut bytes = file.header.clone();
    bytes.resize(file.total_len as usize, 0);
    for (n, t) in tensors {
        let loc = layout.location(n).unwrap();
        bytes[loc.offset as usize..(loc.offset + loc.len) as usize].copy_from_slice(&t.bytes);
    }
    crate::export::write_atomically(path, &bytes)
}

fn parse_header(buf: &[u8]) -> Result<Vec<TensorEntry>> {
    if buf.len() < 8 {
        bail!("truncated: the file is {} bytes, shorter than the 8-byte header length", buf.len());
    }
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
    if n > (buf.len() - 8) as u64 {
        bail!("header length {} points past the end of the file ({} bytes): truncated or corrupt", n, buf.len());
    }
    let n = n as usize;
    let data_start = 8 + n;
    let data_len = buf.len() - data_start;
    let text = std::str::from_utf8(&buf[8..data_start]).context("header is not UTF-8")?;
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text.trim_end()).context("header is not a JSON object")?;

    let mut tensors = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(value.clone())
            .with_context(|| format!("tensor {name}: unreadable header entry {value}"))?;
        let dtype = DType::from_safetensors(info.dtype).with_context(|| {
            format!(
                "tensor {name}: dtype {:?} is not supported (lamina reads BF16, F16, F32, F64 and integer tensors)",
                info.dtype
            )
        })?;
        let (s, e) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| n.checked_mul(dtype.size()));
        if e < s || e > data_len {
            bail!(
                "tensor {name}: offsets [{s}, {e}] point outside the data section ({data_len} bytes): the file is truncated or its header lies"
            );
        }
        if want != Some(e - s) {
            bail!(
                "tensor {name}: offsets [{s}, {e}] hold {} bytes but dtype {} and shape {:?} need {:?}",
                e - s,
                dtype.name(),
                info.shape,
                want
            );
        }
        tensors.push(TensorEntry { name, dtype, shape: info.shape, start: data_start + s, end: data_start + e });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for w in tensors.windows(2) {
        if w[1].start < w[0].end {
            bail!("tensors {} and {} overlap in the file", w[0].name, w[1].name);
        }
    }
    Ok(tensors)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Writes a safetensors file from (name, dtype, shape, bytes), with an optional raw header override.
    pub fn write_file(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut off = 0;
        for (name, dt, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + bytes.len()]}),
            );
            off += bytes.len();
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut f = File::create(path).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&h).unwrap();
        for (_, _, _, b) in tensors {
            f.write_all(b).unwrap();
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lamina-st-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("m.safetensors")
    }

    #[test]
    fn reads_a_valid_file() {
        let p = tmp("ok");
        write_file(&p, &[("a", "BF16", vec![2, 2], vec![0; 8]), ("b", "F32", vec![1], vec![0, 0, 128, 63])]);
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.tensors.len(), 2);
        let b = f.get("b").unwrap();
        assert_eq!(crate::tensor::decode_f32(b.dtype, f.bytes(b)).unwrap(), vec![1.0]);
    }

    #[test]
    fn truncation_names_the_tensor() {
        let p = tmp("trunc");
        write_file(&p, &[("a", "BF16", vec![4], vec![0; 8]), ("w", "BF16", vec![8], vec![0; 16])]);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 3).unwrap();
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("tensor w") && err.contains("outside"), "{err}");
        assert!(err.contains("m.safetensors"), "{err}");
    }

    #[test]
    fn lying_and_overlapping_headers_are_refused() {
        let p = tmp("lie");
        let h = br#"{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[4,12]}}"#;
        let mut f = File::create(&p).unwrap();
        f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
        f.write_all(h).unwrap();
        f.write_all(&[0; 12]).unwrap();
        drop(f);
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("overlap"), "{err}");

        let p = tmp("len");
        let mut f = File::create(&p).unwrap();
        f.write_all(&(1u64 << 40).to_le_bytes()).unwrap();
        f.write_all(b"{}").unwrap();
        drop(f);
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("header length"), "{err}");

        let p = tmp("size");
        write_file(&p, &[("w", "BF16", vec![3], vec![0; 8])]);
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("tensor w") && err.contains("need"), "{err}");
    }

    #[test]
    fn save_and_load_round_trip() {
        let p = tmp("save");
        let a = Tensor::from_f32(&[2], &[1.5, -2.0]);
        let b = Tensor::from_i64(&[3], &[1, 2, 3]);
        let c = Tensor::from_i8(&[1], &[-4]);
        save(&p, &[("a".into(), a.clone()), ("c".into(), c.clone()), ("b".into(), b.clone())]).unwrap();
        let m = load_all(&p).unwrap();
        assert_eq!((m["a"].clone(), m["b"].clone(), m["c"].clone()), (a, b, c));
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let p = tmp("dtype");
        write_file(&p, &[("w", "F8_E4M3", vec![4], vec![0; 4])]);
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("tensor w") && err.contains("F8_E4M3"), "{err}");
    }
}
