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

/// GiB in a plan's `human` figure (`412.5 MiB`, `3.48 GiB`).
fn gib(figure: &str) -> f64 {
    let mut it = figure.split_whitespace();
    let v: f64 = it.next().unwrap().parse().unwrap();
    match it.next().unwrap() {
        "GiB" => v,
        "MiB" => v / 1024.0,
        "KiB" => v / (1024.0 * 1024.0),
        unit => panic!("unexpected unit {unit} in {figure}"),
    }
}

/// The predicted peak of a plan's `memory` line.
fn predicted_peak(out: &str) -> f64 {
    let m = field(out, "memory");
    gib(m.strip_prefix("predicted peak ").and_then(|r| r.split(" (").next()).unwrap_or_else(|| panic!("{m}")))
}

/// Data-free quantization of the 235B streams in well under 1 GiB whatever the budget: kept tensors
/// (the 1.16 GiB lm_head and embeddings) are copied in pieces, and the read-ahead is bounded.
/// DeepSeek-V3 (FP8, MLA) too, within a 1 GiB budget: its dense layers' 126 MiB int8 weights make
/// the writer's queue 378 MiB, so with a large budget the read-ahead takes it just over 1 GiB.
#[test]
fn data_free_235b_plans_within_1_gib() {
    for (model, budgets) in [("qwen3-vl-235b-a22b", &["1", "64"][..]), ("deepseek-v3", &["1"][..])] {
        let path = config(model).display().to_string();
        for q in ["w8a8_dynamic", "w4a16", "w4a8_dynamic"] {
            for budget in budgets {
                if model == "deepseek-v3" && q == "w4a16" {
                    // DeepSeek's bundled recipes are w8a8 / w8a8_dynamic / w4a8_dynamic.
                    continue;
                }
                let r = run(&["plan", "--model_path", &path, "--quant_type", q, "--memory_budget", budget], &[]);
                r.assert_ok();
                let peak = predicted_peak(&r.stdout);
                assert!(peak <= 1.0, "{model} {q}, budget {budget}: predicted peak {peak} GiB:\n{}", r.stdout);
                assert_eq!(field(&r.stdout, "fits"), "yes");
            }
        }
    }
}

/// Calibrated W8A8 of the 235B (static attention, dynamic experts) and of DeepSeek-V3 (static
/// MLA, dynamic experts) plans within 16 GiB: the routed experts (128 and 256 per layer) stream
/// through each layer in groups instead of being held with it. Holding them
/// (`LAMINA_EXPERT_GROUP=0`) costs several times more, which is what the streaming saves.
#[test]
fn calibrated_235b_plans_within_16_gib_with_experts_streamed() {
    for model in ["qwen3-vl-235b-a22b", "deepseek-v3"] {
        let path = config(model).display().to_string();
        let args = ["plan", "--model_path", &path, "--quant_type", "w8a8", "--memory_budget", "16"];
        let r = run(&args, &[]);
        r.assert_ok();
        let streamed = predicted_peak(&r.stdout);
        assert!(streamed <= 16.0, "{model}: predicted peak {streamed} GiB:\n{}", r.stdout);
        assert_eq!(field(&r.stdout, "fits"), "yes");
        assert!(field(&r.stdout, "time").starts_with("about "), "{}", r.stdout);
        let held = run(&args, &[("LAMINA_EXPERT_GROUP", "0")]);
        let held = predicted_peak(&held.stdout);
        assert!(held > 2.0 * streamed, "{model}: experts held: {held} GiB, streamed: {streamed} GiB");
    }
}

#[test]
fn a_tiny_budget_is_refused_naming_the_largest_unit_and_the_shortfall() {
    let r = plan(&config("qwen3-vl-235b-a22b"), "0.2");
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

/// GLM-4.1V-9B (`glm4v`, tests/fixtures/configs/glm-4.1v-9b: 40 GLM-4 layers with M-RoPE, a 24-block
/// vision tower) on paper with its recipe: the tower's embeddings, 24 blocks and merger, then the
/// embeddings, 40 layers and the head; a few GiB at most per unit, so it fits a 64 GiB card.
#[test]
fn glm_4_1v_9b_plans_on_paper() {
    let r = plan(&config("glm-4.1v-9b"), "64");
    r.assert_ok();
    assert_eq!(field(&r.stdout, "architecture"), "glm4v (config.json only, on paper)");
    assert!(field(&r.stdout, "text").starts_with("40 layers, hidden 4096"), "{}", r.stdout);
    let units: usize = field(&r.stdout, "units").parse().unwrap();
    assert_eq!(units, 1 + 24 + 1 + 1 + 40 + 1, "{}", r.stdout);
    assert!(r.stdout.contains("model.visual.blocks.0 "), "{}", r.stdout);
    assert!(r.stdout.contains("model.language_model.layers.39"), "{}", r.stdout);
    assert_eq!(field(&r.stdout, "fits"), "yes");
}

/// Hunyuan-A13B (`hunyuan_v1_moe`, tests/fixtures/configs/hunyuan-a13b: 32 layers, every one 64
/// experts top-8 plus a shared MLP, per-layer lists in the config) fits a 64 GiB card layer by layer,
/// data-free and calibrated, for MindIE. For vLLM-Ascend the plan refuses: its table of fused modules
/// has no `hunyuan_v1_moe` row, so quantized experts would not load (see tests/quantize_fixtures.rs).
#[test]
fn hunyuan_a13b_fits_64_gib_on_paper() {
    let cfg = config("hunyuan-a13b");
    let path = cfg.display().to_string();
    let args = |qt: &'static str, target: &'static str| {
        ["plan", "--model_path", &path, "--quant_type", qt, "--memory_budget", "64", "--target", target]
            .map(String::from)
    };
    let refused = args("w8a8_dynamic", "vllm-ascend");
    run(&refused.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        .assert_fails_with(&["has no \"experts\" entry", "model.layers.31.mlp.experts"]);
    for quant_type in ["w8a8_dynamic", "w8a8"] {
        let a = args(quant_type, "mindie");
        let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        r.assert_ok();
        assert_eq!(field(&r.stdout, "architecture"), "hunyuan_v1_moe (config.json only, on paper)");
        assert!(field(&r.stdout, "text").starts_with("32 layers, hidden 4096"), "{}", r.stdout);
        assert!(field(&r.stdout, "text").contains("64 experts top-8"), "{}", r.stdout);
        let units: usize = field(&r.stdout, "units").parse().unwrap();
        assert_eq!(units, 32 + 2, "{}", r.stdout);
        assert_eq!(field(&r.stdout, "fits"), "yes", "{quant_type}: {}", r.stdout);
    }
}

/// Hunyuan-Large (Hunyuan-A52B, `hunyuan`, tests/fixtures/configs/hunyuan-large: 64 layers of 16
/// experts top-1 plus a shared MLP, cross-layer attention in pairs) fits a 64 GiB card layer by
/// layer, data-free and calibrated, for MindIE; vLLM-Ascend is refused (vLLM has no model class for
/// `HunYuanForCausalLM`).
#[test]
fn hunyuan_large_fits_64_gib_on_paper() {
    let cfg = config("hunyuan-large");
    let path = cfg.display().to_string();
    let args = |qt: &'static str, target: &'static str| {
        ["plan", "--model_path", &path, "--quant_type", qt, "--memory_budget", "64", "--target", target]
            .map(String::from)
    };
    let refused = args("w8a8", "vllm-ascend");
    run(&refused.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        .assert_fails_with(&["HunYuanForCausalLM", "registry.py"]);
    for quant_type in ["w8a8_dynamic", "w8a8"] {
        let a = args(quant_type, "mindie");
        let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
        r.assert_ok();
        assert_eq!(field(&r.stdout, "architecture"), "hunyuan (config.json only, on paper)");
        assert!(field(&r.stdout, "text").starts_with("64 layers, hidden 6400"), "{}", r.stdout);
        assert!(field(&r.stdout, "text").contains("16 experts top-1"), "{}", r.stdout);
        let units: usize = field(&r.stdout, "units").parse().unwrap();
        assert_eq!(units, 64 + 2, "{}", r.stdout);
        assert_eq!(field(&r.stdout, "fits"), "yes", "{quant_type}: {}", r.stdout);
    }
}

/// DeepSeek-V3 / R1 (671B: tests/fixtures/configs/deepseek-v3, 61 layers of 256 routed experts
/// top-8 plus a shared one, MLA, FP8 with 128 × 128 block scales, one MTP layer): the data-free W8A8
/// run fits one 64 GiB card, layer by layer (and the calibrated one: see the 16 GiB test above).
#[test]
fn deepseek_v3_671b_fits_64_gib_on_paper() {
    let cfg = config("deepseek-v3");
    {
        let quant_type = "w8a8_dynamic";
        let r = run(
            &["plan", "--model_path", &cfg.display().to_string(), "--quant_type", quant_type, "--memory_budget", "64"],
            &[],
        );
        r.assert_ok();
        assert_eq!(field(&r.stdout, "architecture"), "deepseek_v3 (config.json only, on paper)");
        assert!(field(&r.stdout, "text").starts_with("61 layers, hidden 7168"), "{}", r.stdout);
        assert!(field(&r.stdout, "text").contains("256 experts top-8"), "{}", r.stdout);
        // 61 decoder layers, the MTP layer, the embeddings and the head.
        let units: usize = field(&r.stdout, "units").parse().unwrap();
        assert_eq!(units, 61 + 1 + 2, "{}", r.stdout);
        assert!(r.stdout.contains("model.layers.61 (MTP)"), "{}", r.stdout);
        assert_eq!(field(&r.stdout, "fits"), "yes", "{quant_type}:\n{}", r.stdout);
    }
}

/// Qwen3-Next-80B-A3B (tests/fixtures/configs/qwen3-next-80b-a3b: 48 layers, 36 of them Gated
/// DeltaNet, 512 experts top-10 with a gated shared expert, the `mtp.*` block) fits a 64 GiB card.
#[test]
fn qwen3_next_80b_fits_64_gib_on_paper() {
    let r = plan(&config("qwen3-next-80b-a3b"), "64");
    r.assert_ok();
    assert_eq!(field(&r.stdout, "architecture"), "qwen3_next (config.json only, on paper)");
    assert!(field(&r.stdout, "text").starts_with("48 layers, hidden 2048"), "{}", r.stdout);
    assert!(field(&r.stdout, "text").contains("512 experts top-10"), "{}", r.stdout);
    let units: usize = field(&r.stdout, "units").parse().unwrap();
    assert_eq!(units, 48 + 1 + 2, "{}", r.stdout);
    assert!(r.stdout.contains("mtp (MTP)"), "{}", r.stdout);
    assert_eq!(field(&r.stdout, "fits"), "yes");
}

/// GLM-4.5V (`glm4v_moe`, tests/fixtures/configs/glm-4.5v: 46 MoE layers of GLM-4.5-Air, 128 experts
/// top-8 plus a shared expert, layer 0 dense; GLM-4.1V's 24-block tower) on paper with its recipe: the
/// tower's embeddings, 24 blocks and merger, then the embeddings, 46 layers and the head; it fits a
/// 64 GiB card layer by layer (the whole model is ~200 GiB in bf16).
#[test]
fn glm_4_5v_fits_64_gib_on_paper() {
    let r = plan(&config("glm-4.5v"), "64");
    r.assert_ok();
    assert_eq!(field(&r.stdout, "architecture"), "glm4v_moe (config.json only, on paper)");
    assert!(field(&r.stdout, "text").starts_with("46 layers, hidden 4096"), "{}", r.stdout);
    assert!(field(&r.stdout, "text").contains("128 experts top-8"), "{}", r.stdout);
    let units: usize = field(&r.stdout, "units").parse().unwrap();
    assert_eq!(units, 1 + 24 + 1 + 1 + 46 + 1, "{}", r.stdout);
    assert!(r.stdout.contains("model.visual.blocks.0 "), "{}", r.stdout);
    // The release holds 107,710,933,120 parameters in bf16 (215.4 GB = 200.63 GiB in its 46 shards, the
    // report the config came from): the inventory synthesized from config.json has as many bytes.
    assert_eq!(field(&r.stdout, "bytes in"), "200.63 GiB", "{}", r.stdout);
    assert!(r.stdout.contains("model.language_model.layers.45"), "{}", r.stdout);
    assert_eq!(field(&r.stdout, "fits"), "yes");
}
