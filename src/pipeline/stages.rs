//! The stream: reader → transform → writer on three threads joined by bounded channels, so
//! unit i+1 is read ahead while unit i is quantized and unit i-1 is written.

use super::plan::{Plan, UnitPlan};
use super::progress::Progress;
use crate::export::{OutMeta, OutTensor};
use crate::io::checkpoint::Checkpoint;
use crate::io::journal::{Event, History, Journal};
use crate::io::shards::{ShardLayout, ShardWriter};
use anyhow::{bail, Context, Result};
use crossbeam_channel::{bounded, Receiver};
use std::collections::{BTreeMap, HashMap};

/// What a processor hands the writer.
pub enum Output {
    /// Whole tensors.
    Tensors(Vec<OutTensor>),
    /// Bytes `offset..offset + bytes.len()` of the planned tensor `meta`: a large tensor goes in
    /// pieces, in order, so that it is never held whole.
    Piece { meta: OutMeta, offset: u64, bytes: Vec<u8> },
}

impl From<Vec<OutTensor>> for Output {
    fn from(ts: Vec<OutTensor>) -> Output {
        Output::Tensors(ts)
    }
}

/// Where a processor sends its outputs.
pub type Emit<'a> = dyn FnMut(Output) -> Result<()> + 'a;

/// Turns one unit into output tensors. The data-free quantizer is one; calibration is another.
pub trait UnitProcessor: Send {
    /// Processes unit `index`, handing outputs to `emit` as soon as each job has them.
    fn process(&mut self, index: usize, unit: &UnitPlan, emit: &mut Emit) -> Result<()>;
}

enum Msg {
    Out(Output),
    UnitDone(usize),
}

/// What the writer needs to finish shards and record progress.
pub struct WriteState<'a> {
    pub layout: &'a ShardLayout,
    pub writer: ShardWriter,
    pub journal: Journal,
    /// CRC-32 and length of every tensor written so far (this run and earlier ones).
    pub crcs: HashMap<String, (u32, u64)>,
    /// How many units the journal records as finished (the transform reads it to know which
    /// activation snapshots a resume could still need).
    pub committed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Runs units `start..` through the stream.
pub fn run(
    plan: &Plan,
    ckpt: &Checkpoint,
    processor: &mut dyn UnitProcessor,
    state: &mut WriteState,
    start: usize,
    progress: &mut Progress,
) -> Result<()> {
    let n = plan.units.len();
    let (out_tx, out_rx) = bounded::<Msg>(super::plan::WRITER_QUEUE);
    let planned: HashMap<&str, &OutMeta> = plan.outputs().map(|o| (o.meta.name.as_str(), o)).collect();
    // The last unit that writes into each shard: the shard is complete once that unit is.
    let mut last_unit_of_shard = vec![0usize; state.layout.files.len()];
    for (i, u) in plan.units.iter().enumerate() {
        for o in &u.outputs {
            let s = state.layout.location(&o.meta.name).unwrap().shard;
            last_unit_of_shard[s] = last_unit_of_shard[s].max(i);
        }
    }

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let stop = &stop;
        let reader = s.spawn(move || {
            let units = plan.units[start..].iter().map(|u| &u.unit);
            crate::model::load::read_ahead(ckpt, units, plan.memory.read_ahead, stop);
        });
        let transform = s.spawn(move || -> Result<()> {
            let _stop_reader = StopOnDrop(stop);
            for i in start..n {
                let unit = &plan.units[i];
                processor
                    .process(i, unit, &mut |out| out_tx.send(Msg::Out(out)).context("the writer stopped"))
                    .with_context(|| format!("while processing {}", unit.unit.name))?;
                out_tx.send(Msg::UnitDone(i)).context("the writer stopped")?;
            }
            Ok(())
        });
        let written = write_loop(plan, out_rx, &planned, &last_unit_of_shard, state, progress);
        // If the writer failed, dropping its receiver stops the transform at its next send.
        let transformed = transform.join().map_err(|_| anyhow::anyhow!("the transform stage panicked"))?;
        let _ = reader.join();
        written?;
        transformed
    })
}

/// Sets its flag when dropped: the transform stage tells the reader to stop however it ends.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn write_loop(
    plan: &Plan,
    rx: Receiver<Msg>,
    planned: &HashMap<&str, &OutMeta>,
    last_unit_of_shard: &[usize],
    st: &mut WriteState,
    progress: &mut Progress,
) -> Result<()> {
    let mut unit_crcs: BTreeMap<String, u32> = BTreeMap::new();
    // Tensors arriving in pieces: the CRC of the bytes so far, and their count.
    let mut partial: HashMap<String, (crc32fast::Hasher, u64)> = HashMap::new();
    let mut touched: std::collections::BTreeSet<usize> = Default::default();
    let (abort_after, stall, mut written) = (abort_after_tensors(), stall_after_tensors(), 0u64);
    let planned_as = |meta: &OutMeta| -> Result<()> {
        let want = planned
            .get(meta.meta.name.as_str())
            .with_context(|| format!("output tensor {} is not in the plan", meta.meta.name))?;
        if **want != *meta {
            bail!("output tensor {} came out as {:?}, the plan said {:?}", meta.meta.name, meta, want);
        }
        Ok(())
    };
    for msg in rx {
        let mut finished: Vec<(String, u32, u64)> = Vec::new();
        let done = match msg {
            Msg::Out(Output::Tensors(ts)) => {
                for t in ts {
                    planned_as(&t.out_meta())?;
                    st.writer.write(st.layout, &t.name, &t.tensor.bytes)?;
                    let crc = crc32fast::hash(&t.tensor.bytes);
                    finished.push((t.name, crc, t.tensor.bytes.len() as u64));
                }
                None
            }
            Msg::Out(Output::Piece { meta, offset, bytes }) => {
                planned_as(&meta)?;
                let name = &meta.meta.name;
                let (crc, got) = partial.entry(name.clone()).or_insert_with(|| (crc32fast::Hasher::new(), 0));
                if offset != *got {
                    bail!("output tensor {name}: a piece at byte {offset} came after {got} bytes");
                }
                st.writer.write_piece(st.layout, name, offset, &bytes)?;
                crc.update(&bytes);
                *got += bytes.len() as u64;
                if *got == meta.meta.nbytes() {
                    let (crc, len) = partial.remove(name).unwrap();
                    finished.push((name.clone(), crc.finalize(), len));
                }
                None
            }
            Msg::UnitDone(i) => Some(i),
        };
        for (name, crc, len) in finished {
            touched.insert(st.layout.location(&name).unwrap().shard);
            st.crcs.insert(name.clone(), (crc, len));
            unit_crcs.insert(name, crc);
            written += 1;
            if abort_after == Some(written) {
                eprintln!("LAMINA_FAULT_ABORT_AFTER_TENSORS: aborting after {written} tensors");
                std::process::abort();
            }
            if let Some((n, release)) = &stall {
                if *n == written {
                    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
                    while !release.exists() && std::time::Instant::now() < until {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
            }
        }
        if let Some(i) = done {
            let unit = &plan.units[i];
            if unit_crcs.len() != unit.outputs.len() {
                let missing: Vec<_> = unit
                    .outputs
                    .iter()
                    .filter(|o| !unit_crcs.contains_key(&o.meta.name))
                    .map(|o| &o.meta.name)
                    .collect();
                bail!("{} finished without writing {:?}", unit.unit.name, missing);
            }
            for &s in &touched {
                st.writer.sync(st.layout, s)?;
            }
            st.journal.record(&Event::Unit {
                index: i,
                name: unit.unit.name.clone(),
                tensors: std::mem::take(&mut unit_crcs),
            })?;
            st.committed.store(i + 1, std::sync::atomic::Ordering::SeqCst);
            touched.clear();
            for (k, &last) in last_unit_of_shard.iter().enumerate() {
                if last == i {
                    finish_shard(st, k)?;
                }
            }
            progress.step(i as u64 + 1, unit.unit.stored_bytes, &unit.unit.name);
        }
    }
    Ok(())
}

/// Syncs and closes a complete shard and records its checksum, combined from its tensors' CRCs.
/// It keeps its hidden name until the whole run is complete.
pub fn finish_shard(st: &mut WriteState, k: usize) -> Result<()> {
    let crc = shard_crc(st.layout, k, &st.crcs)?;
    st.writer.close(st.layout, k)?;
    st.journal.record(&Event::Shard { index: k, file: st.layout.files[k].name.clone(), crc32: crc })
}

/// A testing aid for crash recovery: `LAMINA_FAULT_ABORT_AFTER_TENSORS=N` aborts the process right
/// after the N-th tensor this process writes, in the middle of a unit and of a shard.
fn abort_after_tensors() -> Option<u64> {
    std::env::var("LAMINA_FAULT_ABORT_AFTER_TENSORS").ok().and_then(|v| v.parse().ok())
}

/// A testing aid for the save folder's lock: `LAMINA_FAULT_STALL_AFTER_TENSORS=N:FILE` pauses the writer
/// after the N-th tensor until FILE exists (60 s at most), so that a test can start a second run meanwhile.
fn stall_after_tensors() -> Option<(u64, std::path::PathBuf)> {
    let v = std::env::var("LAMINA_FAULT_STALL_AFTER_TENSORS").ok()?;
    let (n, file) = v.split_once(':')?;
    Some((n.parse().ok()?, file.into()))
}

/// The CRC-32 of shard `k`'s file: its header followed by its tensors in file order.
pub fn shard_crc(layout: &ShardLayout, k: usize, crcs: &HashMap<String, (u32, u64)>) -> Result<u32> {
    let f = &layout.files[k];
    let mut h = crc32fast::Hasher::new();
    h.update(&f.header);
    for t in &f.tensors {
        let &(crc, len) = crcs.get(&t.name).with_context(|| format!("no checksum recorded for {}", t.name))?;
        h.combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
    }
    Ok(h.finalize())
}

/// Rebuilds the tensor checksums of finished units from the journal.
pub fn crcs_from_history(plan: &Plan, h: &History) -> HashMap<String, (u32, u64)> {
    let mut out = HashMap::new();
    for (i, u) in plan.units.iter().enumerate() {
        if let Some(rec) = h.units.get(&i) {
            for o in &u.outputs {
                if let Some(&crc) = rec.get(&o.meta.name) {
                    out.insert(o.meta.name.clone(), (crc, o.meta.nbytes()));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn combined_crc_equals_crc_of_concatenation() {
        let (a, b) = (b"header bytes".to_vec(), vec![7u8; 1000]);
        let mut h = crc32fast::Hasher::new();
        h.update(&a);
        h.combine(&crc32fast::Hasher::new_with_initial_len(crc32fast::hash(&b), b.len() as u64));
        let whole: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        assert_eq!(h.finalize(), crc32fast::hash(&whole));
    }
}
