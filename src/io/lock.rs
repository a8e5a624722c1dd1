//! The save folder's lock: one run writes a folder at a time.
//!
//! `lamina quant` takes an exclusive `flock` on `SAVE/.lamina.lock` before it reads or changes anything
//! in the folder, and holds it until the process ends. The kernel drops the lock when the process dies,
//! however it dies (a kill, a crash, a power loss leaves no lock behind), so a stale lock never blocks a
//! rerun. A second run on the same folder fails at once with the first run's pid, and leaves the folder
//! alone. The file stays in the folder (removing it would let a third run lock a new file while a second
//! still holds the old one); it is empty apart from the pid of the last run.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
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
    let mut f = open(dir)?;
    let got = try_flock(&f, libc::LOCK_EX).with_context(|| format!("cannot lock {}", dir.join(LOCK_FILE).display()))?;
    if !got {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim();
        bail!(
            "another lamina run{} is writing {} now; wait for it to finish (or stop it) and run this command again. Nothing was changed",
            if holder.is_empty() { String::new() } else { format!(" (pid {holder})") },
            dir.display()
        );
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(FolderLock { _file: f })
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
