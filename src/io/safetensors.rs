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

/// Several safetensors files read as one set of named tensors (an output folder's shards): which file
/// holds a tensor, its raw bytes, and its values decoded; a missing tensor is an error naming the folder.
pub struct SafetensorsSet {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    index: std::collections::BTreeMap<String, usize>,
}

impl SafetensorsSet {
    /// Opens `paths` (files of the folder `dir`); a tensor stored twice is read from the last file.
    pub fn open(dir: &Path, paths: &[PathBuf]) -> Result<SafetensorsSet> {
        let files: Vec<SafetensorsFile> = paths.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<_>>()?;
        let mut index = std::collections::BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for t in &f.tensors {
                index.insert(t.name.clone(), i);
            }
        }
        Ok(SafetensorsSet { dir: dir.to_path_buf(), files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor names from `start` on, in order (`names_from(prefix)` then stop at the first name
    /// without the prefix).
    pub fn names_from<'a>(&'a self, start: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.index.range(start.to_string()..).map(|(n, _)| n)
    }

    /// A tensor's dtype, shape and stored bytes.
    pub fn raw(&self, name: &str) -> Result<(DType, Vec<usize>, &[u8])> {
        let &i =
            self.index.get(name).with_context(|| format!("tensor {name} is missing from {}", self.dir.display()))?;
        let e = self.files[i].get(name).expect("the index names a tensor of this file");
        Ok((e.dtype, e.shape.clone(), self.files[i].bytes(e)))
    }

    /// A float tensor's shape and values as f32.
    pub fn f32s(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (dtype, shape, bytes) = self.raw(name)?;
        Ok((shape, crate::tensor::decode_f32(dtype, bytes).with_context(|| format!("tensor {name}"))?))
    }

    /// An integer tensor's shape and values.
    pub fn ints(&self, name: &str) -> Result<(Vec<usize>, Vec<i64>)> {
        let (dtype, shape, bytes) = self.raw(name)?;
        Ok((shape, crate::tensor::decode_i64(dtype, bytes).with_context(|| format!("tensor {name}"))?))
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
    crate::export::write_atomically(path, &serialize(tensors)?)
}

/// The bytes of a safetensors file holding `tensors` (wider dtypes first, so every tensor is aligned).
pub fn serialize(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let metas: Vec<TensorMeta> = tensors.iter().map(|(n, t)| t.meta(n)).collect();
    let layout = crate::io::shards::ShardLayout::plan(&metas, None, &|_, _| String::new())?;
    let file = &layout.files[0];
    let mut bytes = file.header.clone();
    bytes.resize(file.total_len as usize, 0);
    for (n, t) in tensors {
        let loc = layout.location(n).unwrap();
        bytes[loc.offset as usize..(loc.offset + loc.len) as usize].copy_from_slice(&t.bytes);
    }
    Ok(bytes)
}

/// Parses and validates a safetensors file's header from the file's bytes: every entry's dtype, shape and
/// offsets, sorted by offset, or an error naming what is wrong (and the tensor, when one is). Never panics,
/// whatever the bytes (fuzzed in the tests below and by `fuzz/`).
pub fn parse_header(buf: &[u8]) -> Result<Vec<TensorEntry>> {
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
                "tensor {name}: dtype {:?} is not supported (lamina reads BF16, F16, F32, F64, integer tensors, and \
                 F8_E4M3 weights with block scales)",
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

    /// A small xorshift generator: the property tests are deterministic.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// A valid file's bytes: tensors of several dtypes and shapes, one empty, with metadata.
    fn valid_file() -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut off = 0;
        for (name, dt, shape, size) in [
            ("model.layers.0.self_attn.q_proj.weight", "BF16", vec![4, 8], 2),
            ("model.layers.0.self_attn.q_proj.weight_scale", "F32", vec![4, 1], 4),
            ("model.layers.0.mlp.experts.3.up_proj.weight", "I8", vec![2, 16], 1),
            ("model.embed_tokens.weight", "F16", vec![8, 4], 2),
            ("model.layers.0.self_attn.q_proj.deq_scale", "I64", vec![4], 8),
            ("empty", "F32", vec![0, 3], 4),
        ] {
            let n = shape.iter().product::<usize>() * size;
            header
                .insert(name.into(), serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}));
            off += n;
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut buf = (h.len() as u64).to_le_bytes().to_vec();
        buf.extend_from_slice(&h);
        buf.extend((0..off).map(|i| i as u8));
        buf
    }

    /// One random change to a file: bytes flipped, the file cut, the header length lied about, numbers in
    /// the header swapped for extreme ones, JSON structure broken, or plain noise.
    fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
        let mut b = valid.to_vec();
        let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let extreme = [
            "18446744073709551615",
            "9223372036854775808",
            "-1",
            "1e300",
            "4294967296",
            "0",
            "3.5",
            "null",
            "\"x\"",
            "[]",
            "{}",
        ];
        for _ in 0..1 + rng.below(3) {
            match rng.below(9) {
                0 => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                1 => b.truncate(rng.below(b.len() + 1)),
                2 => {
                    let lie: u64 = match rng.below(4) {
                        0 => rng.next(),
                        1 => (hlen as u64).wrapping_add(rng.below(16) as u64).wrapping_sub(8),
                        2 => u64::MAX,
                        _ => 0,
                    };
                    if b.len() >= 8 {
                        b[..8].copy_from_slice(&lie.to_le_bytes());
                    }
                }
                3 | 4 => {
                    // Replace a run of digits inside the header with an extreme value.
                    let end = (8 + hlen).min(b.len());
                    let digits: Vec<usize> = (8..end).filter(|&i| b[i].is_ascii_digit()).collect();
                    if let Some(&i) = digits.get(rng.below(digits.len())) {
                        let mut j = i;
                        while j < end && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        let with = extreme[rng.below(extreme.len())].as_bytes();
                        b.splice(i..j, with.iter().copied());
                        let new_len = hlen + with.len() - (j - i);
                        b[..8].copy_from_slice(&(new_len as u64).to_le_bytes());
                    }
                }
                5 => {
                    // Swap a dtype for another string.
                    let names = ["BF16", "F32", "I8", "F16", "I64", "F8_E4M3", "Q4", "bf16", "", "F64"];
                    let text = String::from_utf8_lossy(&b[8..(8 + hlen).min(b.len())]).to_string();
                    let from = names[rng.below(5)];
                    let to = names[rng.below(names.len())];
                    let new = text.replacen(&format!("\"{from}\""), &format!("\"{to}\""), 1);
                    let mut nb = (new.len() as u64).to_le_bytes().to_vec();
                    nb.extend_from_slice(new.as_bytes());
                    nb.extend_from_slice(&b[(8 + hlen).min(b.len())..]);
                    b = nb;
                }
                6 => {
                    // Insert a random byte string into the header (broken JSON, non-UTF-8, deep nesting).
                    let at = 8 + rng.below(hlen.min(b.len().saturating_sub(8)) + 1);
                    let junk: Vec<u8> = match rng.below(3) {
                        0 => (0..rng.below(8) + 1).map(|_| rng.next() as u8).collect(),
                        1 => vec![b'['; 200 + rng.below(400)],
                        _ => b"\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},".to_vec(),
                    };
                    let n = junk.len();
                    b.splice(at.min(b.len())..at.min(b.len()), junk);
                    if b.len() >= 8 && rng.below(2) == 0 {
                        b[..8].copy_from_slice(&((hlen + n) as u64).to_le_bytes());
                    }
                }
                7 => b = (0..rng.below(64)).map(|_| rng.next() as u8).collect(),
                _ => {
                    // Append or drop data bytes.
                    if rng.below(2) == 0 {
                        b.extend((0..rng.below(32)).map(|_| rng.next() as u8));
                    } else {
                        let keep = b.len().saturating_sub(rng.below(32));
                        b.truncate(keep);
                    }
                }
            }
            if b.len() < 8 {
                break;
            }
        }
        b
    }

    /// Random and mutated headers: the parser never panics; it refuses with a message, or it accepts a
    /// header whose every entry is consistent (in bounds, sized by dtype × shape, not overlapping).
    #[test]
    fn fuzzed_headers_never_panic_and_errors_say_what_is_wrong() {
        let valid = valid_file();
        assert_eq!(parse_header(&valid).unwrap().len(), 6);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut refused, mut accepted) = (0, 0);
        for case in 0..20_000 {
            let buf = mutate(&mut rng, &valid);
            let got = std::panic::catch_unwind(|| parse_header(&buf));
            let Ok(got) = got else { panic!("case {case}: the parser panicked on {} bytes", buf.len()) };
            match got {
                Err(e) => {
                    let msg = format!("{e:#}");
                    assert!(!msg.is_empty() && msg.len() < 2000, "case {case}: {msg}");
                    let known = ["truncated", "header length", "not UTF-8", "not a JSON object", "tensor ", "tensors "];
                    assert!(known.iter().any(|k| msg.contains(k)), "case {case}: unclear error {msg}");
                    refused += 1;
                }
                Ok(entries) => {
                    let data_start = 8 + u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
                    for e in &entries {
                        assert!(e.start >= data_start && e.start <= e.end && e.end <= buf.len(), "case {case}: {e:?}");
                        assert_eq!(e.nbytes(), e.shape.iter().product::<usize>() * e.dtype.size(), "case {case}");
                    }
                    for w in entries.windows(2) {
                        assert!(w[1].start >= w[0].end, "case {case}: overlap");
                    }
                    accepted += 1;
                }
            }
        }
        // The mutations reach both sides.
        assert!(refused > 10_000 && accepted > 100, "refused {refused}, accepted {accepted}");
        // Through a file, every error names it.
        let p = tmp("fuzz-file");
        for _ in 0..50 {
            let buf = mutate(&mut rng, &valid);
            std::fs::write(&p, &buf).unwrap();
            if let Err(e) = SafetensorsFile::open(&p) {
                assert!(format!("{e:#}").contains("m.safetensors"), "{e:#}");
            }
        }
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let p = tmp("dtype");
        write_file(&p, &[("w", "F8_E5M2", vec![4], vec![0; 4])]);
        let err = format!("{:#}", SafetensorsFile::open(&p).unwrap_err());
        assert!(err.contains("tensor w") && err.contains("F8_E5M2"), "{err}");
    }
}
