//! Crash and resume: a run killed at random points (and aborted deterministically in the middle
//! of a unit and of a shard) and rerun until done gives the bytes of an uninterrupted run; a
//! rerun with other arguments refuses; `--overwrite` starts over; a finished run does nothing.

mod common;

use common::check::{check_output, Scheme};
use common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

const PART: &str = "0.0001";
const SIGABRT: i32 = 6;
const PART_BYTES: u64 = (0.0001 * (1u64 << 30) as f64) as u64;

/// Units the journal records as finished.
fn units_done(save: &Path) -> usize {
    std::fs::read_to_string(save.join(".lamina-journal.jsonl"))
        .map(|j| j.lines().filter(|l| l.contains("\"event\":\"unit\"")).count())
        .unwrap_or(0)
}

fn journal_complete(save: &Path) -> bool {
    std::fs::read_to_string(save.join(".lamina-journal.jsonl")).is_ok_and(|j| j.contains("\"event\":\"complete\""))
}

fn spawn(model: &Path, save: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let mut args = quant_args(model, save, "w8a8_dynamic");
    args.extend(["--part_file_size".to_string(), PART.to_string()]);
    let mut c = Command::new(BIN);
    c.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    for v in FAULT_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[test]
fn killed_at_random_points_then_rerun_gives_the_uninterrupted_bytes() {
    let tmp = TempDir::new("kill");
    let model = write_synthetic_moe(&tmp.join("model"), 40, 0x5eed);
    let reference = tmp.join("reference");
    quant(&model, &reference, "w8a8_dynamic", &["--part_file_size", PART], &[]).assert_ok();
    let seen = check_output(&model, &reference, Scheme::W8A8Dynamic, Some(PART_BYTES));
    assert!(seen.shards >= 20, "the test wants many shards, got {}", seen.shards);
    let want = snapshot(&reference, false);
    let total_units = units_done(&reference);

    let save = tmp.join("interrupted");
    // Deterministic crashes first: abort() right after the N-th tensor written by that process.
    for n in [1, 45, 400] {
        let before = units_done(&save);
        let status = spawn(&model, &save, &[("LAMINA_FAULT_ABORT_AFTER_TENSORS", &n.to_string())]).wait().unwrap();
        assert_eq!(status.signal(), Some(SIGABRT), "the run was to abort after {n} tensors: {status:?}");
        assert!(!journal_complete(&save));
        assert_no_complete_output(&save);
        let partials = std::fs::read_dir(&save)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".partial"));
        assert!(partials.count() > 0, "an aborted run leaves its shards under hidden names");
        assert!(units_done(&save) >= before);
    }

    // Then SIGKILL at random points: once the journal shows a random number of further units
    // finished, after a random few hundred microseconds more.
    let mut rng = Rng::new(0xC0FFEE);
    let (mut kills, mut finished) = (0, false);
    for _ in 0..10 {
        let done = units_done(&save);
        let target = done + rng.below((total_units - done) as u64 + 1) as usize;
        let delay = Duration::from_micros(rng.below(800));
        let mut child = spawn(&model, &save, &[]);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if units_done(&save) >= target {
                std::thread::sleep(delay);
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        if status.success() {
            finished = true;
            break;
        }
        assert_eq!(status.signal(), Some(9), "{status:?}");
        kills += 1;
    }
    eprintln!("{kills} SIGKILLs landed before the run finished");
    if !finished {
        quant(&model, &save, "w8a8_dynamic", &["--part_file_size", PART], &[]).assert_ok();
    }
    let got = snapshot(&save, false);
    assert_eq!(differing(&want, &got), Vec::<String>::new(), "the resumed output differs from the uninterrupted one");
    assert!(journal_complete(&save));
    // The completed output says so when run again.
    let r = quant(&model, &save, "w8a8_dynamic", &["--part_file_size", PART], &[]);
    r.assert_ok();
    assert!(r.stderr.contains("nothing to do"), "{}", r.stderr);
}

fn mtimes(dir: &Path) -> Vec<(String, SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().to_string(), e.metadata().unwrap().modified().unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn resume_rules() {
    let tmp = TempDir::new("rules");
    let model = fixture("qwen3");
    let save = tmp.join("out");
    quant(&model, &save, "w8a16", &[], &[]).assert_ok();
    let (files, times) = (snapshot(&save, true), mtimes(&save));

    // Finished: says so, exits 0, touches nothing.
    std::thread::sleep(Duration::from_millis(20));
    let r = quant(&model, &save, "w8a16", &[], &[]);
    r.assert_ok();
    assert!(r.stderr.contains("already holds the finished output"), "{}", r.stderr);
    // The memory budget changes how the run is scheduled, not its output: not a difference.
    quant(&model, &save, "w8a16", &["--memory_budget", "2"], &[]).assert_ok();
    assert_eq!((snapshot(&save, true), mtimes(&save)), (files.clone(), times.clone()));

    // Other arguments: refused, naming what differs, nothing touched.
    quant(&model, &save, "w8a8_dynamic", &[], &[]).assert_fails_with(&[
        "quant_type",
        "w8a16",
        "w8a8_dynamic",
        "--overwrite",
    ]);
    quant(&model, &save, "w8a16", &["--part_file_size", "0.0001"], &[])
        .assert_fails_with(&["part_file_size", "--overwrite"]);
    // A shard limit that gives the same number of files but other contents is still a difference.
    quant(&model, &save, "w8a16", &["--part_file_size", "1"], &[]).assert_fails_with(&["part_file_size"]);
    assert_eq!((snapshot(&save, true), mtimes(&save)), (files.clone(), times));

    // --overwrite starts over, and gives what a fresh run gives.
    quant(&model, &save, "w8a8_dynamic", &["--overwrite"], &[]).assert_ok();
    check_output(&model, &save, Scheme::W8A8Dynamic, None);
    let fresh = tmp.join("fresh");
    quant(&model, &fresh, "w8a8_dynamic", &[], &[]).assert_ok();
    assert_eq!(differing(&snapshot(&save, false), &snapshot(&fresh, false)), Vec::<String>::new());

    // An unfinished run refuses other arguments too.
    let part = tmp.join("partial");
    let status = Command::new(BIN)
        .args(quant_args(&model, &part, "w8a16"))
        .env("LAMINA_FAULT_ABORT_AFTER_TENSORS", "5")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(SIGABRT));
    quant(&model, &part, "w8a8_dynamic", &[], &[]).assert_fails_with(&["unfinished", "quant_type", "--overwrite"]);
    quant(&model, &part, "w8a16", &[], &[]).assert_ok();
    check_output(&model, &part, Scheme::W8A16, None);
    assert_eq!(differing(&snapshot(&part, false), &files_without_hidden(&files)), Vec::<String>::new());
}

fn files_without_hidden(
    s: &std::collections::BTreeMap<String, Vec<u8>>,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    s.iter().filter(|(k, _)| !k.starts_with('.')).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Drops the journal's last line if it is the completion record.
fn forget_completion(save: &Path) {
    let path = save.join(".lamina-journal.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"event\":\"complete\"")).collect();
    std::fs::write(&path, kept.join("\n") + "\n").unwrap();
}

#[test]
fn stopped_while_publishing_resumes_and_a_changed_shard_is_caught() {
    let tmp = TempDir::new("publish");
    let model = fixture("qwen3_vl_moe");
    let save = tmp.join("out");
    quant(&model, &save, "w8a16", &["--part_file_size", PART], &[]).assert_ok();
    let want = snapshot(&save, false);
    let shards: Vec<String> = want.keys().filter(|k| k.starts_with("quant_model_weights-")).cloned().collect();
    assert!(shards.len() > 2);

    // As if stopped in the middle of publishing: one shard renamed back to its hidden name, the
    // description and index not yet written, no completion recorded.
    forget_completion(&save);
    let hidden = save.join(format!(".{}.partial", shards[1]));
    std::fs::rename(save.join(&shards[1]), &hidden).unwrap();
    std::fs::remove_file(save.join("quant_model_description.json")).unwrap();
    std::fs::remove_file(save.join("quant_model_weights.safetensors.index.json")).unwrap();
    let r = quant(&model, &save, "w8a16", &["--part_file_size", PART], &[]);
    r.assert_ok();
    assert!(!r.stderr.contains("nothing to do"), "{}", r.stderr);
    assert_eq!(differing(&want, &snapshot(&save, false)), Vec::<String>::new());
    assert!(!hidden.exists());

    // A finished shard that changed on disk is not trusted.
    forget_completion(&save);
    let victim = save.join(&shards[0]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&victim, bytes).unwrap();
    quant(&model, &save, "w8a16", &["--part_file_size", PART], &[]).assert_fails_with(&[
        &victim.display().to_string(),
        "changed",
        "--overwrite",
    ]);
}
