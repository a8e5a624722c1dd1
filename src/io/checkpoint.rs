//! A Hugging Face checkpoint folder: `config.json`, and `model.safetensors` or shards listed by
//! `model.safetensors.index.json`. Tensors are found by name and read zero-copy from the maps.

use super::safetensors::{SafetensorsFile, TensorEntry};
use crate::tensor::{decode_f32, DType};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CONFIG: &str = "config.json";
pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE: &str = "model.safetensors";

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub files: Vec<Arc<SafetensorsFile>>,
    /// Tensor name → (file, position in that file's tensor list).
    index: BTreeMap<String, (usize, usize)>,
}

/// Reads and parses `config.json` of a folder (or a path to the file itself).
pub fn read_config(path: &Path) -> Result<serde_json::Value> {
    let file = if path.is_dir() { path.join(CONFIG) } else { path.to_path_buf() };
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", file.display()))?;
    if !v.is_object() {
        bail!("{} does not hold a JSON object", file.display());
    }
    Ok(v)
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        if !dir.is_dir() {
            bail!("model path {} is not a folder", dir.display());
        }
        let config = read_config(dir)?;
        let (files, index) = if dir.join(INDEX).is_file() {
            open_sharded(dir)?
        } else if dir.join(SINGLE).is_file() {
            let f = Arc::new(SafetensorsFile::open(&dir.join(SINGLE))?);
            let index = f.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), (0, i))).collect();
            (vec![f], index)
        } else {
            bail!("{} holds neither {SINGLE} nor {INDEX}", dir.display());
        };
        Ok(Checkpoint { dir: dir.to_path_buf(), config, files, index })
    }

    /// Bytes of input given back so far, over all files.
    pub fn released_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.released_bytes()).sum()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn entry(&self, name: &str) -> Option<(&Arc<SafetensorsFile>, &TensorEntry)> {
        let &(f, i) = self.index.get(name)?;
        Some((&self.files[f], &self.files[f].tensors[i]))
    }

    /// Finds a tensor or says which file should have held it.
    pub fn require(&self, name: &str) -> Result<(&Arc<SafetensorsFile>, &TensorEntry)> {
        self.entry(name)
            .with_context(|| format!("tensor {name} is missing from the checkpoint in {}", self.dir.display()))
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (f, e) = self.require(name)?;
        Ok(f.bytes(e))
    }

    /// Reads a float tensor widened to f32.
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (f, e) = self.require(name)?;
        if !e.dtype.is_float() {
            bail!("tensor {name} in {} has dtype {}, not a float type", f.path.display(), e.dtype.name());
        }
        Ok((e.shape.clone(), decode_f32(e.dtype, f.bytes(e))?))
    }

    pub fn dtype_of(&self, name: &str) -> Option<DType> {
        self.entry(name).map(|(_, e)| e.dtype)
    }

    /// The dtype most float weights have (used where the output format depends on it).
    pub fn main_float_dtype(&self) -> DType {
        let mut bytes: BTreeMap<DType, usize> = BTreeMap::new();
        for f in &self.files {
            for t in f.tensors.iter().filter(|t| t.dtype.is_float()) {
                *bytes.entry(t.dtype).or_default() += t.nbytes();
            }
        }
        bytes.into_iter().max_by_key(|&(_, b)| b).map(|(d, _)| d).unwrap_or(DType::BF16)
    }

    /// Files of the folder that are neither weights nor the config: tokenizer, processor, chat
    /// template, generation config, licence. They are copied to the output as they are.
    pub fn companion_files(&self) -> Result<Vec<PathBuf>> {
        companion_files(&self.dir)
    }
}

pub fn companion_files(dir: &Path) -> Result<Vec<PathBuf>> {
    const WEIGHT_EXT: [&str; 6] = ["safetensors", "bin", "pt", "pth", "gguf", "ckpt"];
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let ext = Path::new(&name).extension().map(|x| x.to_string_lossy().to_string()).unwrap_or_default();
        let is_weights = WEIGHT_EXT.contains(&ext.as_str()) || name.ends_with(".index.json");
        if e.file_type()?.is_file() && name != CONFIG && !name.starts_with('.') && !is_weights {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

type Opened = (Vec<Arc<SafetensorsFile>>, BTreeMap<String, (usize, usize)>);

fn open_sharded(dir: &Path) -> Result<Opened> {
    let index_path = dir.join(INDEX);
    let text = std::fs::read_to_string(&index_path).with_context(|| format!("cannot read {}", index_path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map object", index_path.display()))?;
    let mut file_names: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
    file_names.sort();
    file_names.dedup();
    let mut files = Vec::new();
    for name in &file_names {
        if name.contains('/') || name.contains("..") {
            bail!("{} names a shard outside the folder: {name}", index_path.display());
        }
        let path = dir.join(name);
        if !path.is_file() {
            bail!("shard {} listed in {} does not exist", path.display(), index_path.display());
        }
        files.push(Arc::new(SafetensorsFile::open(&path)?));
    }
    let mut index = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: entry for {tensor} is not a file name", index_path.display()))?;
        let fi = file_names.binary_search_by(|n| n.as_str().cmp(file)).unwrap();
        let f = &files[fi];
        let ti = f.position(tensor).with_context(|| {
            format!(
                "tensor {tensor} is listed in {} but missing from its shard {}",
                index_path.display(),
                f.path.display()
            )
        })?;
        index.insert(tensor.clone(), (fi, ti));
    }
    Ok((files, index))
}
