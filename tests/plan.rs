//! `lamina plan` from a real config alone (Qwen3-VL-235B-A22B and 30B-A3B, copied from their
//! releases' dimensions into tests/fixtures/configs), and the memory budget check of `quant`.

mod common;

use common::*;

fn config(name: &str) -> std::path::PathBuf {
    fixture("configs").join(name).join("config.json")
}

fn plan(model: &std::path::Path, budget: &str) -> Run {
    run(
        &[
            "plan",
            "--model_path",
            &model.display().to_string(),
            "--quant_type",
            "w8a8_dynamic",
            "--memory_budget",
            budget,
        ],
        &[],
    )
}

/// The value after `label :` on its line of the plan.
fn field<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(label).map(|rest| rest.trim_start().trim_start_matches(':').trim()))
        .unwrap_or_else(|| panic!("the plan has no {label:?} line:\n{out}"))
}

#[test]
fn qwen3_vl_235b_fits_64_gib_on_paper() {
    let tmp = TempDir::new("plan-235b");
    // Both a config.json path and a folder holding only it.
    std::fs::copy(config("qwen3-vl-235b-a22b"), tmp.join("config.json")).unwrap();
    for model in [config("qwen3-vl-235b-a22b"), tmp.path().to_path_buf()] {
        let r = plan(&model, "64");
        r.assert_ok();
        assert_eq!(field(&r.stdout, "architecture"), "qwen3_vl_moe (config.json only, on paper)");
        assert!(field(&r.stdout, "text").starts_with("94 layers, hidden 4096"), "{}", r.stdout);
        assert!(field(&r.stdout, "text").contains("128 experts top-8"), "{}", r.stdout);
        // 94 text layers, 27 vision blocks, and the embeddings / mergers / head units.
        let units: usize = field(&r.stdout, "units").parse().unwrap();
        assert!(units >= 94 + 27, "{units} units");
        assert_eq!(field(&r.stdout, "fits"), "yes");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "plan writes nothing");
}

#[test]
fn qwen3_vl_30b_fits_64_gib_on_paper() {
    let r = plan(&config("qwen3-vl-30b-a3b"), "64");
    r.assert_ok();
    assert!(field(&r.stdout, "text").starts_with("48 layers, hidden 2048"), "{}", r.stdout);
    assert_eq!(field(&r.stdout, "fits"), "yes");
}

#[test]
fn a_tiny_budget_is_refused_naming_the_largest_unit_and_the_shortfall() {
    let r = plan(&config("qwen3-vl-235b-a22b"), "1");
    assert!(matches!(r.code, Some(c) if c != 0), "{r:?}");
    let largest = r
        .stdout
        .lines()
        .find(|l| l.ends_with("<- largest"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no unit is marked largest:\n{}", r.stdout));
    let verdict = field(&r.stdout, "fits");
    assert!(verdict.starts_with("NO"), "{verdict}");
    assert!(verdict.contains(largest) && verdict.contains("short by"), "{verdict}");
}

#[test]
fn quant_with_a_too_small_budget_writes_nothing() {
    let tmp = TempDir::new("budget");
    let save = tmp.join("out");
    quant(&fixture("qwen3_vl_moe"), &save, "w8a8_dynamic", &["--memory_budget", "0.01"], &[])
        .assert_fails_with(&["memory budget", "short by"]);
    assert!(!save.exists(), "the save folder must not be created when the run cannot fit");
}

#[test]
fn plan_of_a_checkpoint() {
    let r = plan(&fixture("qwen3_vl_moe"), "8");
    r.assert_ok();
    assert_eq!(field(&r.stdout, "architecture"), "qwen3_vl_moe (checkpoint)");
    assert_eq!(field(&r.stdout, "fits"), "yes");
}

/// GLM-4.6 (`glm4_moe`, tests/fixtures/configs/glm-4.6: 92 layers, 160 experts top-8, one shared
/// expert, the first 3 layers dense, one MTP layer) fits a 64 GiB card layer by layer.
#[test]
fn glm_4_6_fits_64_gib_on_paper() {
    let r = plan(&config("glm-4.6"), "64");
    r.assert_ok();
    assert_eq!(field(&r.stdout, "architecture"), "glm4_moe (config.json only, on paper)");
    assert!(field(&r.stdout, "text").starts_with("92 layers, hidden 5120"), "{}", r.stdout);
    assert!(field(&r.stdout, "text").contains("160 experts top-8"), "{}", r.stdout);
    // 92 decoder layers, the MTP layer, the embeddings and the head.
    let units: usize = field(&r.stdout, "units").parse().unwrap();
    assert_eq!(units, 92 + 1 + 2, "{}", r.stdout);
    assert!(r.stdout.contains("model.layers.92 (MTP)"), "{}", r.stdout);
    assert_eq!(field(&r.stdout, "fits"), "yes");
}
