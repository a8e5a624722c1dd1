//! A full disk: the run stops cleanly with a message that says so, leaves nothing that looks
//! finished, and resumes to the bytes of an uninterrupted run once space is freed. Two ways:
//! the writer's fault injection (a real ENOSPC error after N bytes), and a real, small tmpfs in a
//! private mount namespace.

mod common;

use common::check::{check_output, Scheme};
use common::*;
use std::process::Command;

const PART: &str = "0.0001";

#[test]
fn enospc_mid_run_stops_cleanly_and_resumes() {
    let tmp = TempDir::new("enospc");
    let model = fixture("qwen3_vl_moe");
    let args = ["--part_file_size", PART];
    let reference = tmp.join("reference");
    quant(&model, &reference, "w8a8_dynamic", &args, &[]).assert_ok();
    let want = snapshot(&reference, false);

    // Full before the first header, inside the first shards, and near the end; each time the
    // rerun continues from where the previous one stopped.
    let save = tmp.join("out");
    for bytes in ["0", "3000", "150000", "400000"] {
        let r = quant(&model, &save, "w8a8_dynamic", &args, &[("LAMINA_FAULT_ENOSPC_AFTER", bytes)]);
        r.assert_fails_with(&["disk full", &save.display().to_string(), "run the same command again"]);
        assert_no_complete_output(&save);
    }
    quant(&model, &save, "w8a8_dynamic", &args, &[]).assert_ok();
    assert_eq!(differing(&want, &snapshot(&save, false)), Vec::<String>::new());
    check_output(&model, &save, Scheme::W8A8Dynamic, Some((0.0001 * (1u64 << 30) as f64) as u64));
}

#[test]
fn a_small_tmpfs_is_refused_up_front_then_completes_once_space_is_freed() {
    if !unshare_works() {
        eprintln!("SKIPPED: `unshare -rm` cannot mount a private tmpfs on this machine");
        return;
    }
    let tmp = TempDir::new("tmpfs");
    let model = fixture("qwen3_vl_moe");
    let reference = tmp.join("reference");
    quant(&model, &reference, "w8a8_dynamic", &[], &[]).assert_ok();
    let out_bytes: usize = snapshot(&reference, false).values().map(|v| v.len()).sum();
    assert!(out_bytes > 512 << 10, "the output is {out_bytes} bytes; the tmpfs sizes below assume more than 512 KiB");

    // In a private mount namespace: a 2 MiB tmpfs, filled to leave 256 KiB; the run must refuse
    // before writing; with the filler removed it completes. The result is copied out to compare.
    let (mnt, copy) = (tmp.join("mnt"), tmp.join("copy"));
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&copy).unwrap();
    let save = mnt.join("out");
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=2m tmpfs '{mnt}' || exit 99
head -c $((2048 * 1024 - 256 * 1024)) /dev/zero > '{mnt}/filler' || exit 98
'{bin}' quant --model_path '{model}' --save_path '{save}' --quant_type w8a8_dynamic 2> '{copy}/first.err'
echo "first=$?"
ls -A '{save}' > '{copy}/first.ls' 2>/dev/null
rm '{mnt}/filler'
'{bin}' quant --model_path '{model}' --save_path '{save}' --quant_type w8a8_dynamic 2> '{copy}/second.err'
echo "second=$?"
mkdir '{copy}/out' && cp -a '{save}/.' '{copy}/out/'
"#,
        mnt = mnt.display(),
        bin = BIN,
        model = model.display(),
        save = save.display(),
        copy = copy.display()
    );
    let out = Command::new("unshare").args(["-rm", "sh", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let read = |f: &str| std::fs::read_to_string(copy.join(f)).unwrap_or_default();
    let (first, second) = (read("first.err"), read("second.err"));
    assert!(stdout.contains("first=1"), "the first run should fail: {stdout}\n{first}");
    for needle in ["not enough disk space", &save.display().to_string(), "short by"] {
        assert!(first.contains(needle), "the refusal does not mention {needle:?}: {first}");
    }
    let left: Vec<String> = read("first.ls").lines().map(String::from).filter(|n| !n.is_empty()).collect();
    assert!(
        left.iter().all(|n| n.starts_with(".lamina")),
        "the refused run wrote output before checking the space: {left:?}"
    );
    assert!(stdout.contains("second=0"), "the run should complete once space is freed: {stdout}\n{second}");
    assert_eq!(differing(&snapshot(&reference, false), &snapshot(&copy.join("out"), false)), Vec::<String>::new());
}
