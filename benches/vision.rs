//! The vision benchmark: images per second through a Qwen3-VL-sized vision tower (or, with
//! `--config tests/fixtures/configs/internvl2-40b/config.json`, InternVL2-40B's InternViT-6B on
//! `--images` 448×448 tiles), streamed block by block as the calibration pipeline streams it, and the
//! peak RSS that takes.
//!
//! ```text
//! cargo bench --bench vision -- [--config PATH] [--image HxW] [--images N] [--runs R] [--dir DIR] [--keep]
//! ```
//!
//! 1. Builds a checkpoint of the vision tower alone from `config.json` (default: Qwen3-VL-30B-A3B: 27 blocks,
//!    hidden 1152, MLP 4304, 16 heads, patch 16, deepstack mergers after blocks 8, 16, 24), every tensor of
//!    the release layout (`model::layout::synthesize_inventory`, vision units only) filled with random bf16
//!    of trained-model magnitudes (linears ±0.035, norm scales near 1).
//! 2. `--images` images (default 2) of `--image` pixels (default 672x672) are resized as the Qwen3-VL image
//!    processor does (`smart_resize` to multiples of patch 16 × merge 2 within its pixel bounds), giving
//!    the grid; their `pixel_values` are random in [-1, 1] (what normalisation gives).
//! 3. In a child process (so its `ru_maxrss` is the measured part's alone), `--runs` times (default 3):
//!    the tower runs over all images unit by unit, as the calibration pipeline will: each unit's weights
//!    loaded (`vision::load_unit`, which gives each tensor's mapped pages back once widened to f32), the
//!    unit run, its weights dropped. Then block 0 is run piece by piece to show where the time goes.
//! 4. Prints medians of wall and CPU time (the CPU time shows the work done even when other processes
//!    share the cores): images per second, seconds per block and per unit load, GFLOP/s, the profile,
//!    and peak RSS against the largest unit's bytes. Deletes the checkpoint unless `--keep`.

mod common;

use common::{cpu_seconds, gemm_throughput, median, run_measured, MB};
use lamina::device::{Cpu, Device};
use lamina::io::checkpoint::Checkpoint;
use lamina::model::layout::UnitKind;
use lamina::model::nn::{Linear, LinearHook};
use lamina::model::vision::internvit::NormType;
use lamina::model::vision::ops;
use lamina::model::vision::{load_unit, VisionInput, VisionState, VisionTower};
use lamina::model::weights::Weights;
use lamina::model::{build_units, Model, Unit};
use lamina::tensor::TensorMeta;
use ndarray::{Array2, ArrayD, ArrayView2};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The Qwen3-VL image processor's pixel bounds (`size.shortest_edge`, `size.longest_edge` of its
/// `preprocessor_config.json`).
const MIN_PIXELS: usize = 65_536;
const MAX_PIXELS: usize = 16_777_216;

struct Args {
    config: PathBuf,
    /// Qwen: each image's size before `smart_resize` (default 672x672); InternVL: the tile size.
    image: Option<(usize, usize)>,
    images: usize,
    runs: usize,
    /// Thread counts to measure at (`--threads 1,2`); each gets a child process.
    threads: Vec<usize>,
    dir: PathBuf,
    keep: bool,
    child: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs/qwen3-vl-30b-a3b/config.json"),
        image: None,
        images: 2,
        runs: 3,
        threads: vec![1, 2],
        dir: std::env::temp_dir().join(format!("lamina-vision-bench-{}", std::process::id())),
        keep: false,
        child: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value().into(),
            "--image" => {
                let v = value();
                let (h, w) = v.split_once('x').unwrap_or_else(|| panic!("--image HxW, got {v}"));
                a.image = Some((h.parse().expect("--image HxW"), w.parse().expect("--image HxW")));
            }
            "--images" => a.images = value().parse().expect("--images N"),
            "--runs" => a.runs = value().parse().expect("--runs R"),
            "--threads" => a.threads = value().split(',').map(|t| t.trim().parse().expect("--threads 1,2")).collect(),
            "--dir" => a.dir = value().into(),
            "--keep" => a.keep = true,
            "--child" => a.child = true,
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.runs >= 1 && a.images >= 1 && a.image.is_none_or(|(h, w)| h > 0 && w > 0));
    a
}

fn main() {
    let args = parse_args();
    if args.child {
        measure(&args);
        return;
    }
    let model_dir = args.dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let t = Instant::now();
    let bytes = write_vision_checkpoint(&args.config, &model_dir);
    println!(
        "checkpoint    : {} (vision tower of {}), {:.0} MB bf16, written in {:.1} s",
        model_dir.display(),
        args.config.display(),
        bytes as f64 / MB,
        t.elapsed().as_secs_f64()
    );

    let (mut ok, mut throughput) = (true, Vec::new());
    for &threads in &args.threads {
        println!("=== {threads} thread(s) ===");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .arg("--child")
            .arg("--dir")
            .arg(&args.dir)
            .args(args.image.iter().flat_map(|(h, w)| ["--image".to_string(), format!("{h}x{w}")]))
            .args(["--images", &args.images.to_string(), "--runs", &args.runs.to_string()])
            .env("RAYON_NUM_THREADS", threads.to_string())
            .env("LAMINA_BENCH_RESULT", args.dir.join("result.txt"));
        let run = run_measured(&mut child);
        ok &= run.ok;
        if run.ok {
            let images_per_s: f64 =
                std::fs::read_to_string(args.dir.join("result.txt")).unwrap().trim().parse().unwrap();
            throughput.push((threads, images_per_s));
            let largest = largest_unit(&model_dir);
            println!(
                "peak RSS      : {:.0} MB = {:.2}x the largest unit ({}, {:.0} MB bf16, {:.0} MB as f32)",
                run.peak_rss as f64 / MB,
                run.peak_rss as f64 / largest.1 as f64,
                largest.0,
                largest.1 as f64 / MB,
                2.0 * largest.1 as f64 / MB,
            );
        }
    }
    if let Some(&(_, one)) = throughput.iter().find(|(t, _)| *t == 1) {
        for &(t, x) in throughput.iter().filter(|(t, _)| *t > 1) {
            println!(
                "efficiency    : {t} threads {:.2}x the images/s of 1 = {:.0}% parallel efficiency",
                x / one,
                100.0 * x / one / t as f64
            );
        }
    }
    if args.keep {
        println!("kept {}", args.dir.display());
    } else {
        std::fs::remove_dir_all(&args.dir).unwrap();
    }
    assert!(ok, "the measuring child failed");
}

/// The vision tensors of `config`'s release layout as one `model.safetensors`; returns its data bytes.
fn write_vision_checkpoint(config_path: &Path, dir: &Path) -> u64 {
    common::write_synthetic_checkpoint(config_path, dir, &|model, name| {
        matches!(model.layout.classify(name), UnitKind::VisionPre | UnitKind::VisionBlock(_) | UnitKind::VisionPost)
    })
}

/// The vision unit with the most stored bytes.
fn largest_unit(model_dir: &Path) -> (String, u64) {
    let (_, _, units) = open(model_dir);
    let u = units.iter().max_by_key(|u| u.stored_bytes).unwrap();
    (u.name.clone(), u.stored_bytes)
}

fn open(model_dir: &Path) -> (Checkpoint, Model, Vec<Unit>) {
    let ckpt = Checkpoint::open(model_dir).unwrap();
    let names: Vec<&str> = ckpt.names().collect();
    let model = Model::new(&ckpt.config, None, &names).unwrap();
    let inventory: Vec<TensorMeta> = ckpt.names().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
    let units = build_units(&model, &inventory).unwrap();
    (ckpt, model, units)
}

/// transformers' Qwen2-VL `smart_resize`: both sides rounded to multiples of `factor`, then scaled
/// into `[min_pixels, max_pixels]` keeping the aspect ratio.
fn smart_resize(h: usize, w: usize, factor: usize, min_pixels: usize, max_pixels: usize) -> (usize, usize) {
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    let mut hb = ((hf / f).round_ties_even() * f) as usize;
    let mut wb = ((wf / f).round_ties_even() * f) as usize;
    if hb * wb > max_pixels {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = factor.max(((hf / beta / f).floor() * f) as usize);
        wb = factor.max(((wf / beta / f).floor() * f) as usize);
    } else if hb * wb < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = ((hf * beta / f).ceil() * f) as usize;
        wb = ((wf * beta / f).ceil() * f) as usize;
    }
    (hb, wb)
}

/// Wall time and the process's CPU time (all threads): on a shared machine the CPU time shows the
/// work done even when other processes take the cores.
#[derive(Default, Clone, Copy, Debug)]
struct Secs {
    wall: f64,
    cpu: f64,
}

impl std::ops::AddAssign for Secs {
    fn add_assign(&mut self, o: Secs) {
        self.wall += o.wall;
        self.cpu += o.cpu;
    }
}

impl std::ops::Sub for Secs {
    type Output = Secs;
    fn sub(self, o: Secs) -> Secs {
        Secs { wall: self.wall - o.wall, cpu: self.cpu - o.cpu }
    }
}

struct Clock(Instant, f64);

impl Clock {
    fn start() -> Clock {
        Clock(Instant::now(), cpu_seconds())
    }
    fn elapsed(&self) -> Secs {
        Secs { wall: self.0.elapsed().as_secs_f64(), cpu: cpu_seconds() - self.1 }
    }
}

/// A float forward that times its linears and counts their FLOPs.
#[derive(Default)]
struct TimedLinears {
    time: Secs,
    flops: f64,
}

impl LinearHook for TimedLinears {
    fn linear(&mut self, device: &dyn Device, _name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        let c = Clock::start();
        let y = layer.forward(device, x);
        self.time += c.elapsed();
        self.flops += 2.0 * (x.nrows() * layer.in_features() * layer.out_features()) as f64;
        y
    }
}

/// One pass of the tower over all images.
#[derive(Default, Clone)]
struct Run {
    total: Secs,
    load: Secs,
    /// Compute of the blocks alone, and of their linears.
    blocks: Secs,
    block_linears: Secs,
    embed_and_mergers: Secs,
    block_linear_flops: f64,
}

/// What the benchmark needs of a tower: random pixel values of the right form, the tokens each
/// image (tile) becomes, and the shape of its blocks.
struct Setup {
    input: VisionInput,
    /// Tokens per image: attention is full inside each image.
    span: usize,
    dim: usize,
    heads: usize,
    /// How the images became tokens, for the report.
    describe: String,
}

/// Uniform values in [-1, 1] (what normalisation gives), xorshift.
fn random_pixels(n: usize) -> Vec<f32> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn setup(tower: &VisionTower, model: &Model, args: &Args) -> Setup {
    match tower {
        VisionTower::Qwen3Vl(c) => {
            let (ih, iw) = args.image.unwrap_or((672, 672));
            let factor = c.tower.patch_size * c.tower.spatial_merge_size;
            let (h, w) = smart_resize(ih, iw, factor, MIN_PIXELS, MAX_PIXELS);
            let grid = [1, h / c.tower.patch_size, w / c.tower.patch_size];
            let patches = grid[1] * grid[2];
            let features = c.tower.patch_features();
            let pixels = random_pixels(args.images * patches * features);
            Setup {
                input: VisionInput {
                    pixel_values: ArrayD::from_shape_vec(vec![args.images * patches, features], pixels).unwrap(),
                    image_grid_thw: vec![grid; args.images],
                },
                span: patches,
                dim: c.tower.dim,
                heads: c.tower.num_heads,
                describe: format!(
                    "{} image(s) of {ih}x{iw} -> smart_resize {h}x{w} -> grid {grid:?}: {patches} patches, {} merged tokens each",
                    args.images,
                    patches / c.tower.merge_unit()
                ),
            }
        }
        VisionTower::InternVit(c) => {
            // Every tile is an image of `force_image_size` (else `vision_config.image_size`) pixels.
            let size = model
                .config
                .get("force_image_size")
                .and_then(|v| v.as_u64())
                .or_else(|| model.config["vision_config"].get("image_size").and_then(|v| v.as_u64()))
                .expect("config.json has neither force_image_size nor vision_config.image_size")
                as usize;
            if let Some(img) = args.image {
                assert_eq!(img, (size, size), "InternVL tiles are {size}x{size} (force_image_size)");
            }
            let side = size / c.patch_size;
            let pixels = random_pixels(args.images * 3 * size * size);
            Setup {
                input: VisionInput {
                    pixel_values: ArrayD::from_shape_vec(vec![args.images, 3, size, size], pixels).unwrap(),
                    image_grid_thw: Vec::new(),
                },
                span: side * side + 1,
                dim: c.dim,
                heads: c.num_heads,
                describe: format!(
                    "{} tile(s) of {size}x{size}: {side}x{side} patches + the class token = {} tokens each, {} after the pixel shuffle",
                    args.images,
                    side * side + 1,
                    side * side / (c.shuffle * c.shuffle)
                ),
            }
        }
        other => panic!("the vision benchmark runs Qwen3-VL and InternVL towers, not {other:?}"),
    }
}

/// The child: everything that is measured.
fn measure(args: &Args) {
    let model_dir = args.dir.join("model");
    let (ckpt, model, units) = open(&model_dir);
    let tower = VisionTower::from_model(&model).unwrap();
    let Setup { input, span, dim, heads, describe } = setup(&tower, &model, args);
    let tokens = args.images * span;
    // Attention: q·kᵀ and p·v, 2·span²·dim FLOPs each, per image.
    let attention_flops = (4 * args.images * span * span * dim * tower.depth()) as f64;
    println!("input         : {describe}");
    println!(
        "tower         : {} blocks, dim {dim}, {heads} heads, {} threads",
        tower.depth(),
        rayon::current_num_threads()
    );

    let dev = &Cpu;
    let weights = |kind: UnitKind| -> Weights {
        let unit = units.iter().find(|u| u.kind == kind).unwrap_or_else(|| panic!("no unit {kind:?}"));
        load_unit(&ckpt, &model.layout, unit).unwrap()
    };
    let mut runs = Vec::new();
    for r in 1..=args.runs {
        let mut run = Run::default();
        let mut hook = TimedLinears::default();
        let start = Clock::start();
        let timed_load = |run: &mut Run, kind| {
            let c = Clock::start();
            let w = weights(kind);
            run.load += c.elapsed();
            w
        };
        let w = timed_load(&mut run, UnitKind::VisionPre);
        let clock = Clock::start();
        let mut state = tower.embed(dev, &w, &input).unwrap();
        run.embed_and_mergers += clock.elapsed();
        drop(w);
        for i in 0..tower.depth() {
            let w = timed_load(&mut run, UnitKind::VisionBlock(i));
            let (clock, before) = (Clock::start(), hook.time);
            tower.block(dev, i, &w, &mut state, &mut hook).unwrap();
            run.blocks += clock.elapsed();
            run.block_linears += hook.time - before;
        }
        run.block_linear_flops = hook.flops;
        let w = timed_load(&mut run, UnitKind::VisionPost);
        let clock = Clock::start();
        let out = tower.finish(dev, &w, state, &mut hook).unwrap();
        run.embed_and_mergers += clock.elapsed();
        run.total = start.elapsed();
        assert!(out.embeds.nrows() > 0);
        assert!(out.embeds.iter().all(|v| v.is_finite()), "the tower's output is not finite");
        println!(
            "run {r}         : {:.2} s wall, {:.2} s CPU = {:.3} images/s (blocks {:.2} s, weight loading {:.2} s, embed + mergers {:.2} s)",
            run.total.wall,
            run.total.cpu,
            args.images as f64 / run.total.wall,
            run.blocks.wall,
            run.load.wall,
            run.embed_and_mergers.wall
        );
        runs.push(run);
    }

    let med = |f: &dyn Fn(&Run) -> Secs| Secs {
        wall: median(runs.iter().map(|r| f(r).wall).collect()),
        cpu: median(runs.iter().map(|r| f(r).cpu).collect()),
    };
    let depth = tower.depth() as f64;
    let images = args.images as f64;
    let (total, blocks, linears, loads) =
        (med(&|r| r.total), med(&|r| r.blocks), med(&|r| r.block_linears), med(&|r| r.load));
    let block_flops = runs[0].block_linear_flops + attention_flops; // the same every run
    println!("--- medians of {} run(s) (wall / CPU seconds) ---", args.runs);
    println!(
        "images/s      : {:.3} ({:.2} s wall, {:.2} CPU-s per image; {tokens} patches in all)",
        images / total.wall,
        total.wall / images,
        total.cpu / images
    );
    println!(
        "per block     : {:.3} / {:.3} s compute: linears {:.3} / {:.3} s, the rest {:.3} / {:.3} s",
        blocks.wall / depth,
        blocks.cpu / depth,
        linears.wall / depth,
        linears.cpu / depth,
        (blocks.wall - linears.wall) / depth,
        (blocks.cpu - linears.cpu) / depth
    );
    println!(
        "weight load   : {:.3} / {:.3} s per unit ({:.2} s of the run)",
        loads.wall / (depth + 2.0),
        loads.cpu / (depth + 2.0),
        loads.wall
    );
    println!(
        "blocks        : {:.0} GFLOP/s wall, {:.0} GFLOP per CPU-s ({:.2} TFLOP: linears {:.2}, attention {:.2})",
        block_flops / blocks.wall / 1e9,
        block_flops / blocks.cpu / 1e9,
        block_flops / 1e12,
        runs[0].block_linear_flops / 1e12,
        attention_flops / 1e12
    );
    // The machine's GEMM throughput on the blocks' largest product, measured now with these threads.
    let block0 = weights(UnitKind::VisionBlock(0));
    let pieces = Pieces::of(&tower, &block0);
    let inter = block0.get(&format!("{}.weight", pieces.fc1)).unwrap().shape()[0];
    let (gemm, gemm_cpu) = gemm_throughput(span, dim, inter);
    let achieved = block_flops / blocks.wall / 1e9;
    println!(
        "GEMM          : {gemm:.0} GFLOP/s wall, {gemm_cpu:.0} GFLOP per CPU-s ([{span}, {dim}] x [{dim}, {inter}], medians of 5); \
         blocks at {:.0}% of it by wall time (target >= 80%: {}), {:.0}% by CPU time",
        100.0 * achieved / gemm,
        if achieved >= 0.8 * gemm { "met" } else { "MISSED" },
        100.0 * block_flops / blocks.cpu / 1e9 / gemm_cpu
    );
    profile_block(&tower, &pieces, &block0, &weights(UnitKind::VisionPre), &input, heads);
    println!("VmHWM (child) : {:.0} MB", lamina::pipeline::memory::peak_rss() as f64 / MB);
    if let Some(path) = std::env::var_os("LAMINA_BENCH_RESULT") {
        std::fs::write(path, format!("{}", images / total.wall)).unwrap();
    }
}

/// The pieces of a block, as its tower's `block` calls them.
struct Pieces {
    norm: Norm,
    qkv: &'static str,
    proj: &'static str,
    fc1: &'static str,
    fc2: &'static str,
    act: ops::Activation,
    /// InternViT-6B's RMSNorms of all heads' queries and keys.
    qk_norm: bool,
    /// InternViT's layer scales `ls1`, `ls2`.
    layer_scale: bool,
}

enum Norm {
    Layer(f64),
    Rms(f64),
}

impl Pieces {
    fn of(tower: &VisionTower, w: &Weights) -> Pieces {
        match tower {
            VisionTower::Qwen3Vl(c) => Pieces {
                norm: Norm::Layer(1e-6),
                qkv: "attn.qkv",
                proj: "attn.proj",
                fc1: "mlp.linear_fc1",
                fc2: "mlp.linear_fc2",
                act: c.tower.hidden_act,
                qk_norm: false,
                layer_scale: false,
            },
            VisionTower::InternVit(c) => Pieces {
                norm: match c.norm {
                    NormType::LayerNorm => Norm::Layer(c.eps),
                    NormType::RmsNorm => Norm::Rms(c.eps),
                },
                qkv: "attn.qkv",
                proj: "attn.proj",
                fc1: "mlp.fc1",
                fc2: "mlp.fc2",
                act: c.act,
                qk_norm: w.has("attn.q_norm.weight"),
                layer_scale: true,
            },
            _ => unreachable!("setup() refused it"),
        }
    }

    fn norm(&self, w: &Weights, module: &str, x: ArrayView2<f32>) -> Array2<f32> {
        let weight = w.vector(&format!("{module}.weight")).unwrap();
        match self.norm {
            Norm::Layer(eps) => {
                let bias = w.vector(&format!("{module}.bias")).ok();
                ops::layer_norm(x, &weight, bias.as_ref(), eps)
            }
            Norm::Rms(eps) => ops::rms_norm(x, &weight, eps),
        }
    }
}

/// Block 0 run piece by piece (the calls the tower's `block` makes), median of 3 each.
fn profile_block(tower: &VisionTower, p: &Pieces, w: &Weights, pre: &Weights, input: &VisionInput, heads: usize) {
    let dev = &Cpu;
    let state: VisionState = tower.embed(dev, pre, input).unwrap();
    let x = &state.hidden;
    let lin = |name: &str| w.linear(name).unwrap();
    let (qkv_l, proj_l, fc1_l, fc2_l) = (lin(p.qkv), lin(p.proj), lin(p.fc1), lin(p.fc2));

    let mut rows: Vec<(&str, Secs)> = Vec::new();
    let mut time = |what: &'static str, f: &mut dyn FnMut()| {
        let t: Vec<Secs> = (0..3)
            .map(|_| {
                let c = Clock::start();
                f();
                c.elapsed()
            })
            .collect();
        let wall = median(t.iter().map(|s| s.wall).collect());
        let cpu = median(t.iter().map(|s| s.cpu).collect());
        rows.push((what, Secs { wall, cpu }));
    };
    time("weights as Linear (Weights::linear copies)", &mut || {
        for name in [p.qkv, p.proj, p.fc1, p.fc2] {
            std::hint::black_box(w.linear(name).unwrap());
        }
    });
    let mut h = Array2::zeros((0, 0));
    time("norm (x2)", &mut || h = p.norm(w, "norm1", x.view()));
    let mut qkv = Array2::zeros((0, 0));
    time("attn.qkv linear", &mut || qkv = qkv_l.forward(dev, h.view()));
    let (mut qn, mut kn) = (Array2::zeros((0, 0)), Array2::zeros((0, 0)));
    if p.qk_norm {
        time("q / k norms", &mut || {
            let (q, k, _) = ops::split_qkv(&qkv);
            let eps = match p.norm {
                Norm::Layer(eps) | Norm::Rms(eps) => eps,
            };
            qn = ops::rms_norm(q, &w.vector("attn.q_norm.weight").unwrap(), eps);
            kn = ops::rms_norm(k, &w.vector("attn.k_norm.weight").unwrap(), eps);
        });
    }
    let mut o = Array2::zeros((0, 0));
    time("attention core (rotary, q·kᵀ, softmax, p·v)", &mut || {
        let (q, k, v) = ops::split_qkv(&qkv);
        let (q, k) = if p.qk_norm { (qn.view(), kn.view()) } else { (q, k) };
        o = ops::span_attention(dev, q, k, v, heads, state.rotary.as_ref(), &state.spans);
    });
    time("attn.proj linear", &mut || o = proj_l.forward(dev, o.view()));
    let mut m = Array2::zeros((0, 0));
    time("mlp fc1 linear", &mut || m = fc1_l.forward(dev, h.view()));
    let mut fresh = vec![m.clone(), m.clone(), m];
    let mut act = Array2::zeros((0, 0));
    time("activation (hidden_act)", &mut || {
        act = fresh.pop().unwrap();
        p.act.apply_all(&mut act)
    });
    time("mlp fc2 linear", &mut || o = fc2_l.forward(dev, act.view()));
    let mut r = x.clone();
    if p.layer_scale {
        let ls = w.vector("ls1").unwrap();
        time("residual add with layer scale (x2)", &mut || ops::add_scaled_into(&mut r, &o, &ls));
    } else {
        time("residual add (x2)", &mut || ops::add_into(&mut r, &o));
    }
    for (what, t) in rows.iter_mut() {
        if what.ends_with("(x2)") {
            // A block has two of these; one was timed.
            t.wall *= 2.0;
            t.cpu *= 2.0;
        }
    }
    let sum = rows.iter().fold(Secs::default(), |mut a, r| {
        a += r.1;
        a
    });
    println!("profile       : block 0 piece by piece, wall / CPU ({:.3} / {:.3} s in all)", sum.wall, sum.cpu);
    for (what, t) in &rows {
        println!("  {what:<44} {:>7.3} / {:>7.3} s {:>5.1}% of CPU", t.wall, t.cpu, 100.0 * t.cpu / sum.cpu);
    }
}
