//! Output shards, planned before any byte is computed.
//!
//! Every output tensor's name, dtype and shape is known from the plan, so each shard's header
//! and each tensor's offset are fixed up front. Tensors are then written with positional writes
//! into a hidden `.partial` file as units finish, in any order. A shard whose last tensor is in is
//! synced and closed; once every shard is complete they are all renamed to their final names, so
//! a stopped run never leaves a file that looks finished. A resumed run rewrites only unfinished
//! units into the same places, so the result is byte-identical to an uninterrupted run.

use crate::tensor::TensorMeta;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where one tensor goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub shard: usize,
    /// Absolute offset in the shard file.
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone)]
pub struct ShardFile {
    pub name: String,
    /// The 8-byte length and the JSON header, padded with spaces to a multiple of 8.
    pub header: Vec<u8>,
    pub total_len: u64,
    /// Tensors in file order.
    pub tensors: Vec<TensorMeta>,
}

#[derive(Debug, Clone)]
pub struct ShardLayout {
    pub files: Vec<ShardFile>,
    locations: HashMap<String, Location>,
}

impl ShardLayout {
    /// Assigns tensors (in output order) to shards of at most `limit` data bytes: a shard is
    /// closed before a tensor that would take it over the limit, and a tensor larger than the
    /// limit gets a shard of its own. Within a shard, wider dtypes come first so every tensor is
    /// aligned to its element size.
    pub fn plan(
        tensors: &[TensorMeta],
        limit: Option<u64>,
        name: &dyn Fn(usize, usize) -> String,
    ) -> Result<ShardLayout> {
        let mut groups: Vec<Vec<&TensorMeta>> = vec![Vec::new()];
        let mut size = 0u64;
        for t in tensors {
            if let Some(limit) = limit {
                if size > 0 && size + t.nbytes() > limit {
                    groups.push(Vec::new());
                    size = 0;
                }
            }
            groups.last_mut().unwrap().push(t);
            size += t.nbytes();
        }
        let n = groups.len();
        let mut files = Vec::with_capacity(n);
        let mut locations = HashMap::with_capacity(tensors.len());
        for (k, mut group) in groups.into_iter().enumerate() {
            group.sort_by_key(|t| std::cmp::Reverse(t.dtype.size()));
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
            let mut off = 0u64;
            for t in &group {
                header.insert(
                    t.name.clone(),
                    serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.nbytes()]}),
                );
                off += t.nbytes();
            }
            let mut json = serde_json::to_vec(&serde_json::Value::Object(header))?;
            while (json.len() + 8) % 8 != 0 {
                json.push(b' ');
            }
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&json);
            let data_start = bytes.len() as u64;
            let mut off = data_start;
            for t in &group {
                if locations.insert(t.name.clone(), Location { shard: k, offset: off, len: t.nbytes() }).is_some() {
                    bail!("two output tensors are named {}", t.name);
                }
                off += t.nbytes();
            }
            files.push(ShardFile {
                name: name(k, n),
                header: bytes,
                total_len: off,
                tensors: group.into_iter().cloned().collect(),
            });
        }
        Ok(ShardLayout { files, locations })
    }

    pub fn location(&self, name: &str) -> Option<Location> {
        self.locations.get(name).copied()
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.total_len).sum()
    }

    /// `{"metadata": {"total_size": …}, "weight_map": {tensor: file}}`, tensors sorted by name.
    pub fn index_json(&self) -> Result<Vec<u8>> {
        let total: u64 = self.files.iter().flat_map(|f| f.tensors.iter()).map(|t| t.nbytes()).sum();
        let mut map: Vec<(&str, &str)> =
            self.files.iter().flat_map(|f| f.tensors.iter().map(move |t| (t.name.as_str(), f.name.as_str()))).collect();
        map.sort();
        let weight_map: serde_json::Map<String, serde_json::Value> =
            map.into_iter().map(|(t, f)| (t.to_string(), serde_json::Value::String(f.to_string()))).collect();
        let mut v = serde_json::to_vec_pretty(
            &serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
        )?;
        v.push(b'\n');
        Ok(v)
    }
}

/// The hidden name a shard has while it is being written.
pub fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.partial"))
}

/// Positional writes into partial shard files.
pub struct ShardWriter {
    dir: PathBuf,
    open: HashMap<usize, File>,
    /// A testing aid: fail with ENOSPC once this many more bytes would be written.
    fault_after: Option<u64>,
}

impl ShardWriter {
    pub fn new(dir: &Path) -> ShardWriter {
        let fault_after = std::env::var("LAMINA_FAULT_ENOSPC_AFTER").ok().and_then(|v| v.parse().ok());
        ShardWriter { dir: dir.to_path_buf(), open: HashMap::new(), fault_after }
    }

    fn ensure_open(&mut self, layout: &ShardLayout, shard: usize) -> Result<()> {
        if self.open.contains_key(&shard) {
            return Ok(());
        }
        let f = &layout.files[shard];
        let path = partial_path(&self.dir, &f.name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // A resumed partial keeps its written tensors; the header is rewritten in case the
        // previous run stopped before it was.
        if file.metadata()?.len() != f.total_len {
            file.set_len(f.total_len).map_err(|e| disk_error(e, &path))?;
        }
        write_at(&mut self.fault_after, &file, &path, &f.header, 0)?;
        self.open.insert(shard, file);
        Ok(())
    }

    /// Writes one tensor's bytes at its planned place.
    pub fn write(&mut self, layout: &ShardLayout, name: &str, bytes: &[u8]) -> Result<()> {
        let loc = layout.location(name).with_context(|| format!("output tensor {name} is not in the plan"))?;
        if loc.len != bytes.len() as u64 {
            bail!("output tensor {name} has {} bytes, the plan expected {}", bytes.len(), loc.len);
        }
        self.write_piece(layout, name, 0, bytes)
    }

    /// Writes `bytes` at byte `offset` inside tensor `name`'s planned place (a large tensor is
    /// written in pieces, so that it is never held whole).
    pub fn write_piece(&mut self, layout: &ShardLayout, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let loc = layout.location(name).with_context(|| format!("output tensor {name} is not in the plan"))?;
        if offset + bytes.len() as u64 > loc.len {
            bail!(
                "a piece of output tensor {name} at bytes {offset}..{} lies past its planned {} bytes",
                offset + bytes.len() as u64,
                loc.len
            );
        }
        self.ensure_open(layout, loc.shard)?;
        let path = partial_path(&self.dir, &layout.files[loc.shard].name);
        let file = &self.open[&loc.shard];
        write_at(&mut self.fault_after, file, &path, bytes, loc.offset + offset)?;
        start_writeback(file, loc.offset + offset, bytes.len());
        Ok(())
    }

    /// Flushes a shard's written bytes to disk and drops them from the page cache.
    pub fn sync(&mut self, layout: &ShardLayout, shard: usize) -> Result<()> {
        self.ensure_open(layout, shard)?;
        let path = partial_path(&self.dir, &layout.files[shard].name);
        let file = &self.open[&shard];
        file.sync_data().map_err(|e| disk_error(e, &path))?;
        drop_cache(file);
        Ok(())
    }

    /// Flushes a complete shard and closes it; it keeps its hidden name until [`Self::publish`].
    pub fn close(&mut self, layout: &ShardLayout, shard: usize) -> Result<()> {
        self.sync(layout, shard)?;
        self.open.remove(&shard);
        Ok(())
    }

    /// Gives a closed shard its final name. Shards are published only once every shard of the run
    /// is complete, so a stopped run never leaves files that look like finished output. A shard
    /// already published (by a run stopped while publishing) is left as it is.
    pub fn publish(&mut self, layout: &ShardLayout, shard: usize) -> Result<()> {
        let name = &layout.files[shard].name;
        let (from, to) = (partial_path(&self.dir, name), self.dir.join(name));
        if !from.exists() && to.exists() {
            return Ok(());
        }
        std::fs::rename(&from, &to).with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
        Ok(())
    }

    /// Makes the renames of [`Self::publish`] durable.
    pub fn sync_dir(&self) {
        sync_dir(&self.dir);
    }
}

fn write_at(fault_after: &mut Option<u64>, file: &File, path: &Path, bytes: &[u8], offset: u64) -> Result<()> {
    if let Some(left) = fault_after.as_mut() {
        if bytes.len() as u64 > *left {
            return Err(disk_error(std::io::Error::from_raw_os_error(libc::ENOSPC), path));
        }
        *left -= bytes.len() as u64;
    }
    file.write_all_at(bytes, offset).map_err(|e| disk_error(e, path))
}

/// Starts writing a range to disk now, without waiting: the disk stays busy while the next tensors are
/// computed, and the sync at the end of a unit only waits for the last ones.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain advisory syscall on an open descriptor; errors surface at the unit's sync.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Asks the kernel to drop a file's clean pages: written output is not read again.
pub fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain advisory syscall on an open descriptor.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Turns a write error into one that names the file, and says so plainly when the disk is full.
pub fn disk_error(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        anyhow::anyhow!(
            "disk full while writing {}: free some space and run the same command again to resume from the last finished unit",
            path.display()
        )
    } else {
        anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
    }
}

/// The CRC-32 of a whole file.
pub fn file_crc32(path: &Path) -> Result<u32> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    drop_cache(&f);
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn metas() -> Vec<TensorMeta> {
        vec![
            TensorMeta::new("a.weight", DType::I8, &[3, 5]),
            TensorMeta::new("a.weight_scale", DType::F32, &[3, 1]),
            TensorMeta::new("b.weight", DType::BF16, &[7]),
            TensorMeta::new("c.deq", DType::I64, &[2]),
            TensorMeta::new("big", DType::I8, &[100]),
        ]
    }

    #[test]
    fn shards_close_before_the_limit_and_align() {
        let l = ShardLayout::plan(&metas(), Some(60), &|k, n| format!("s{k}of{n}")).unwrap();
        let sizes: Vec<Vec<&str>> =
            l.files.iter().map(|f| f.tensors.iter().map(|t| t.name.as_str()).collect()).collect();
        assert_eq!(sizes, vec![vec!["c.deq", "a.weight_scale", "b.weight", "a.weight"], vec!["big"]]);
        assert_eq!(l.files[1].name, "s1of2");
        for f in &l.files {
            assert_eq!(f.header.len() % 8, 0);
            for t in &f.tensors {
                assert_eq!(l.location(&t.name).unwrap().offset % t.dtype.size() as u64, 0);
            }
        }
        let three = ShardLayout::plan(&metas(), Some(40), &|k, n| format!("s{k}of{n}")).unwrap();
        assert_eq!(three.files.len(), 3);
        let one = ShardLayout::plan(&metas(), None, &|_, n| format!("only{n}")).unwrap();
        assert_eq!(one.files.len(), 1);
    }

    #[test]
    fn written_shards_read_back_with_safetensors() {
        let dir = std::env::temp_dir().join(format!("lamina-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let l = ShardLayout::plan(&metas(), Some(60), &|k, n| format!("w{k}-{n}.safetensors")).unwrap();
        let mut w = ShardWriter::new(&dir);
        for t in metas().iter().rev() {
            let bytes: Vec<u8> = (0..t.nbytes()).map(|i| (i as u8).wrapping_mul(3)).collect();
            w.write(&l, &t.name, &bytes).unwrap();
        }
        for k in 0..l.files.len() {
            w.close(&l, k).unwrap();
            assert!(partial_path(&dir, &l.files[k].name).exists() && !dir.join(&l.files[k].name).exists());
        }
        for k in 0..l.files.len() {
            w.publish(&l, k).unwrap();
            w.publish(&l, k).unwrap();
        }
        let buf = std::fs::read(dir.join("w0-2.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        let t = st.tensor("a.weight_scale").unwrap();
        assert_eq!(t.shape(), &[3, 1]);
        assert_eq!(t.data()[..3], [0, 3, 6]);
        assert!(!partial_path(&dir, "w0-2.safetensors").exists());
    }
}
