//! The resume journal: an append-only JSON-lines file in the save folder recording the run's
//! fingerprint, each finished unit (with the CRC-32 of every tensor it wrote), each finished
//! shard, and completion. Each line is synced before the work it records is relied on; a line
//! cut short by a crash is ignored.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const JOURNAL: &str = ".lamina-journal.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start { fingerprint: Value },
    Unit { index: usize, name: String, tensors: BTreeMap<String, u32> },
    Shard { index: usize, file: String, crc32: u32 },
    Complete,
}

/// What an existing journal says about the save folder.
#[derive(Debug, Default)]
pub struct History {
    pub fingerprint: Option<Value>,
    /// Finished units by index.
    pub units: BTreeMap<usize, BTreeMap<String, u32>>,
    pub shards: BTreeMap<usize, (String, u32)>,
    pub complete: bool,
}

impl History {
    /// The first unit not finished: units are finished in order.
    pub fn next_unit(&self) -> usize {
        (0..).find(|i| !self.units.contains_key(i)).unwrap()
    }
    /// The CRC-32 recorded for an output tensor.
    pub fn tensor_crc(&self, name: &str) -> Option<u32> {
        self.units.values().find_map(|u| u.get(name).copied())
    }
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL)
    }

    /// Reads an existing journal; a truncated last line (a crash mid-write) is dropped.
    pub fn read(dir: &Path) -> Result<Option<History>> {
        let path = Journal::path(dir);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut h = History::default();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.ends_with('\n') {
                break; // cut short by a crash; rewritten by the next append
            }
            let ev: Event = match serde_json::from_str(line.trim_end()) {
                Ok(ev) => ev,
                Err(e) if i + 1 == lines.len() => {
                    let _ = e;
                    break;
                }
                Err(e) => bail!(
                    "{} line {} is corrupt ({e}); remove the save folder or pass --overwrite",
                    path.display(),
                    i + 1
                ),
            };
            match ev {
                Event::Start { fingerprint } => h.fingerprint = Some(fingerprint),
                Event::Unit { index, tensors, .. } => {
                    h.units.insert(index, tensors);
                }
                Event::Shard { index, file, crc32 } => {
                    h.shards.insert(index, (file, crc32));
                }
                Event::Complete => h.complete = true,
            }
        }
        Ok(Some(h))
    }

    /// Opens the journal for appending, first cutting off a partial last line.
    pub fn append(dir: &Path) -> Result<Journal> {
        let path = Journal::path(dir);
        if let Ok(text) = std::fs::read(&path) {
            if let Some(last_nl) = text.iter().rposition(|&b| b == b'\n') {
                if last_nl + 1 != text.len() {
                    OpenOptions::new().write(true).open(&path)?.set_len(last_nl as u64 + 1)?;
                }
            } else if !text.is_empty() {
                OpenOptions::new().write(true).open(&path)?.set_len(0)?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Journal { path, file })
    }

    pub fn record(&mut self, ev: &Event) -> Result<()> {
        let mut line = serde_json::to_vec(ev)?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|e| super::shards::disk_error(e, &self.path))?;
        self.file.sync_data().map_err(|e| super::shards::disk_error(e, &self.path))?;
        Ok(())
    }
}

/// The keys on which two fingerprints differ.
pub fn fingerprint_diff(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return vec!["(whole)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter().filter(|k| a.get(*k) != b.get(*k)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("lamina-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(Journal::path(&dir));
        let mut j = Journal::append(&dir).unwrap();
        j.record(&Event::Start { fingerprint: serde_json::json!({"a": 1}) }).unwrap();
        j.record(&Event::Unit { index: 0, name: "u0".into(), tensors: [("x".to_string(), 7u32)].into() }).unwrap();
        drop(j);
        // A crash in the middle of the next line:
        let mut f = OpenOptions::new().append(true).open(Journal::path(&dir)).unwrap();
        f.write_all(br#"{"event":"unit","ind"#).unwrap();
        let h = Journal::read(&dir).unwrap().unwrap();
        assert_eq!(h.next_unit(), 1);
        assert_eq!(h.tensor_crc("x"), Some(7));
        let mut j = Journal::append(&dir).unwrap();
        j.record(&Event::Complete).unwrap();
        let h = Journal::read(&dir).unwrap().unwrap();
        assert!(h.complete);
        assert_eq!(h.fingerprint, Some(serde_json::json!({"a": 1})));
    }

    #[test]
    fn diff_names_keys() {
        let a = serde_json::json!({"quant": "w8a16", "part": 4});
        let b = serde_json::json!({"quant": "w8a8_dynamic", "part": 4});
        assert_eq!(fingerprint_diff(&a, &b), vec!["quant".to_string()]);
    }
}
