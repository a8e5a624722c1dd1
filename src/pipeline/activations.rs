//! The calibration samples' state between units (hidden states, position ids, image
//! embeddings, deepstack features), one snapshot per finished unit.
//!
//! Every snapshot is written through to a file in the save folder, so a resumed run starts from
//! the last finished unit's exact activations. While the snapshot fits the activation budget it
//! also stays in memory; beyond that it is read back sample by sample from the mapped file, so
//! the resident set holds one sample at a time whatever the calibration set's size.

use crate::io::shards::disk_error;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub const DIR: &str = ".lamina-activations";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    offset: u64,
}

/// Where snapshot `unit` lives in the save folder.
pub fn snapshot_path(save: &Path, unit: usize) -> PathBuf {
    save.join(DIR).join(format!("after-unit-{unit:05}.bin"))
}

fn index_path(data: &Path) -> PathBuf {
    data.with_extension("json")
}

/// Builds a snapshot tensor by tensor.
pub struct SnapshotWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    index: BTreeMap<String, Entry>,
    offset: u64,
    memory: Option<BTreeMap<String, Tensor>>,
    memory_bytes: u64,
    memory_budget: u64,
}

impl SnapshotWriter {
    /// `memory_budget`: how many bytes of this snapshot may also stay in memory.
    pub fn create(path: &Path, memory_budget: u64) -> Result<SnapshotWriter> {
        let dir = path.parent().unwrap();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let tmp = path.with_extension("bin.partial");
        let f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(SnapshotWriter {
            path: path.to_path_buf(),
            tmp,
            out: BufWriter::with_capacity(1 << 20, f),
            index: BTreeMap::new(),
            offset: 0,
            memory: Some(BTreeMap::new()),
            memory_bytes: 0,
            memory_budget,
        })
    }

    pub fn push(&mut self, name: &str, t: Tensor) -> Result<()> {
        if self.index.contains_key(name) {
            bail!("activation snapshot: {name} written twice");
        }
        self.out.write_all(&t.bytes).map_err(|e| disk_error(e, &self.tmp))?;
        self.index.insert(name.to_string(), Entry { dtype: t.dtype, shape: t.shape.clone(), offset: self.offset });
        self.offset += t.bytes.len() as u64;
        self.memory_bytes += t.bytes.len() as u64;
        if self.memory_bytes > self.memory_budget {
            self.memory = None;
        }
        if let Some(m) = &mut self.memory {
            m.insert(name.to_string(), t);
        }
        Ok(())
    }

    /// Syncs the data and its index and gives the snapshot back for reading.
    pub fn finish(self) -> Result<Snapshot> {
        let f = self.out.into_inner().map_err(|e| disk_error(e.into_error(), &self.tmp))?;
        f.sync_all().map_err(|e| disk_error(e, &self.tmp))?;
        drop(f);
        crate::export::write_atomically(&index_path(&self.path), &serde_json::to_vec(&self.index)?)?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| format!("cannot rename {}", self.tmp.display()))?;
        crate::io::shards::sync_dir(self.path.parent().unwrap());
        match self.memory {
            Some(m) => Ok(Snapshot { inner: Inner::Memory(m) }),
            None => Snapshot::open(&self.path),
        }
    }
}

enum Inner {
    Memory(BTreeMap<String, Tensor>),
    Mapped { map: Mmap, index: BTreeMap<String, Entry>, path: PathBuf },
}

/// A finished snapshot.
pub struct Snapshot {
    inner: Inner,
}

impl Snapshot {
    /// Maps a snapshot written by an earlier run (for resume).
    pub fn open(path: &Path) -> Result<Snapshot> {
        let ip = index_path(path);
        let index: BTreeMap<String, Entry> = serde_json::from_slice(
            &std::fs::read(&ip).with_context(|| format!("cannot read the activation index {}", ip.display()))?,
        )
        .with_context(|| format!("{} is corrupt", ip.display()))?;
        let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only map of a file lamina wrote and no longer modifies.
        let map = unsafe { Mmap::map(&f) }?;
        for (name, e) in &index {
            let end = e.offset + (e.shape.iter().product::<usize>() * e.dtype.size()) as u64;
            if end > map.len() as u64 {
                bail!(
                    "{}: {name} lies past the end of the file; remove the save folder or pass --overwrite",
                    path.display()
                );
            }
        }
        Ok(Snapshot { inner: Inner::Mapped { map, index, path: path.to_path_buf() } })
    }

    /// A snapshot that never touches the disk (for `forward` and `eval`).
    pub fn in_memory(tensors: BTreeMap<String, Tensor>) -> Snapshot {
        Snapshot { inner: Inner::Memory(tensors) }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.inner {
            Inner::Memory(m) => m.contains_key(name),
            Inner::Mapped { index, .. } => index.contains_key(name),
        }
    }

    /// A copy of one tensor; mapped pages are given back right after.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match &self.inner {
            Inner::Memory(m) => m.get(name).cloned().with_context(|| format!("activation {name} is missing")),
            Inner::Mapped { map, index, path } => {
                let e =
                    index.get(name).with_context(|| format!("activation {name} is missing from {}", path.display()))?;
                let len = e.shape.iter().product::<usize>() * e.dtype.size();
                let (s, end) = (e.offset as usize, e.offset as usize + len);
                let t = Tensor::from_bytes(e.dtype, &e.shape, map[s..end].to_vec());
                // SAFETY: read-only private map; dropped pages are re-read from the file.
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, len) };
                Ok(t)
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        match &self.inner {
            Inner::Memory(m) => m.keys().cloned().collect(),
            Inner::Mapped { index, .. } => index.keys().cloned().collect(),
        }
    }

    pub fn is_in_memory(&self) -> bool {
        matches!(self.inner, Inner::Memory(_))
    }
}

/// Removes snapshots other than `keep` (older units are never needed again).
pub fn remove_other_snapshots(save: &Path, keep: usize) {
    let dir = save.join(DIR);
    let keep_name = snapshot_path(save, keep);
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p != keep_name && p != index_path(&keep_name) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lamina-acts-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn spilled_and_in_memory_snapshots_read_the_same() {
        for budget in [0u64, 1 << 20] {
            let save = dir(&format!("b{budget}"));
            let p = snapshot_path(&save, 3);
            let mut w = SnapshotWriter::create(&p, budget).unwrap();
            let a = Tensor::from_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
            let ids = Tensor::from_i64(&[3, 1], &[0, 1, 2]);
            w.push("0.hidden", a.clone()).unwrap();
            w.push("0.positions", ids.clone()).unwrap();
            let s = w.finish().unwrap();
            assert_eq!(s.is_in_memory(), budget > 0);
            assert_eq!(s.get("0.hidden").unwrap(), a);
            assert_eq!(s.get("0.positions").unwrap(), ids);
            let reopened = Snapshot::open(&p).unwrap();
            assert_eq!(reopened.get("0.hidden").unwrap(), a);
            assert!(s.get("1.hidden").is_err());
            remove_other_snapshots(&save, 3);
            assert!(p.exists());
            remove_other_snapshots(&save, 4);
            assert!(!p.exists());
        }
    }
}
