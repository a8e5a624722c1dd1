//! The save folder's lock: one run writes a folder at a time.
//!
//! `lamina quant` takes an exclusive `flock` on `SAVE/.lamina.lock` before it reads or changes anything
//! in the folder, and holds it until the process ends. The kernel drops the lock when the process dies,
//! however it dies (a kill, a crash, a power loss leaves no lock behind), so a stale lock never blocks a
//! rerun. A second run on the same folder fails at once, naming the first run's pid (from
//! `/proc/locks`), and leaves the folder alone. The file is empty and stays in the folder, untouched by
//! later runs (removing it would let a third run lock a new file while a second still holds the old one).

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

pub const LOCK_FILE: &str = ".lamina.lock";

/// Holds the lock until dropped (or the process ends).
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

fn open(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))
}

fn try_flock(f: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor this process owns; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes the folder's lock, or fails at once naming the run that holds it.
pub fn lock(dir: &Path) -> Result<FolderLock> {
    let f = open(dir)?;
    let got = try_flock(&f, libc::LOCK_EX).with_context(|| format!("cannot lock {}", dir.join(LOCK_FILE).display()))?;
    if !got {
        bail!(
            "another lamina run{} is writing {} now; wait for it to finish (or stop it) and run this command again. Nothing was changed",
            holder(&f).map_or(String::new(), |pid| format!(" (pid {pid})")),
            dir.display()
        );
    }
    Ok(FolderLock { _file: f })
}

/// The pid holding an flock on the file, from `/proc/locks` (lines like
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF`; the device is hex major:minor).
fn holder(f: &File) -> Option<u32> {
    let md = f.metadata().ok()?;
    let (dev, ino) = (md.dev(), md.ino());
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        let at = fields.iter().position(|f| *f == "FLOCK")?;
        let pid: u32 = fields.get(at + 3)?.parse().ok()?;
        let mut id = fields.get(at + 4)?.split(':');
        let (ma, mi, i) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(ma, 16).ok()? == major
            && u32::from_str_radix(mi, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        same.then_some(pid)
    })
}

/// Whether a run holds the folder's lock right now.
pub fn is_locked(dir: &Path) -> bool {
    if !dir.join(LOCK_FILE).exists() {
        return false;
    }
    match File::open(dir.join(LOCK_FILE)) {
        Ok(f) => matches!(try_flock(&f, libc::LOCK_SH), Ok(false)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_until_the_first_is_dropped() {
        let d = std::env::temp_dir().join(format!("lamina-lock-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(!is_locked(&d));
        let first = lock(&d).unwrap();
        assert!(is_locked(&d));
        // flock locks belong to the open file description: a second open in the same process conflicts too.
        let err = lock(&d).unwrap_err().to_string();
        assert!(err.contains("another lamina run") && err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        assert!(!is_locked(&d));
        let again = lock(&d).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&d);
    }
}
