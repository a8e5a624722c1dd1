//! A quantization run from start to end: open the checkpoint, plan, check the budget and the
//! save folder, stream the units, then write the metadata files.

pub mod activations;
pub mod calibrate;
pub mod data_free;
pub mod estimate;
pub mod eval;
pub mod forward;

pub mod memory;
pub mod plan;
pub mod progress;
pub mod stages;

use crate::export::ascend::AscendExporter;
use crate::export::compressed_tensors::CtExporter;
use crate::export::rules::{self, Described, Setting, Target};
use crate::export::{write_atomically, Exporter, SaveFormat};
use crate::io::checkpoint::{self, Checkpoint};
use crate::io::journal::{fingerprint_diff, Event, History, Journal, JOURNAL};
use crate::io::shards::{file_crc32, partial_path, ShardLayout, ShardWriter};
use crate::model::{build_units, paper_inventory, Model};
use crate::quant::Recipe;
use crate::tensor::{DType, TensorMeta};
use anyhow::{bail, ensure, Context, Result};
use memory::{gib, human};
use plan::{plan_memory, plan_unit, Plan};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The options of `lamina quant` and `lamina plan`, independent of how they were spelled.
#[derive(Debug, Clone)]
pub struct QuantArgs {
    pub model_path: PathBuf,
    pub save_path: Option<PathBuf>,
    pub quant_type: Option<String>,
    pub model_type: Option<String>,
    pub device: String,
    /// GiB; 0 writes one file.
    pub part_file_size: Option<f64>,
    /// GiB; `None` is what the machine has available.
    pub memory_budget: Option<f64>,
    pub config_path: Option<PathBuf>,
    pub overwrite: bool,
    /// Calibration data (text, JSONL, or a folder of images); `None` is the bundled default.
    pub calib_data: Option<PathBuf>,
    pub calib_samples: usize,
    pub calib_seq_len: usize,
    /// Compute threads the run has (for the plan's estimate of its duration).
    pub threads: usize,
    /// The server the output must load in.
    pub target: Target,
    /// The dtype the server computes in; `None` is the checkpoint's `torch_dtype`.
    pub serving_dtype: Option<DType>,
    pub save_format: SaveFormat,
}

impl Default for QuantArgs {
    fn default() -> QuantArgs {
        QuantArgs {
            model_path: PathBuf::new(),
            save_path: None,
            quant_type: None,
            model_type: None,
            device: "cpu".into(),
            part_file_size: None,
            memory_budget: None,
            config_path: None,
            overwrite: false,
            calib_data: None,
            calib_samples: 32,
            calib_seq_len: 512,
            threads: crate::device::threads(),
            target: Target::VllmAscend,
            serving_dtype: None,
            save_format: SaveFormat::Ascend,
        }
    }
}

/// Everything a run needs once planned.
pub struct Prepared {
    pub plan: Plan,
    pub ckpt: Option<Checkpoint>,
    pub exporter: Box<dyn Exporter>,
    pub save_format: SaveFormat,
    pub target: Target,
    pub serving: DType,
    /// The recipe calibrates: calibration data flows through the model layer by layer.
    pub calibrated: bool,
    /// Bytes of one activation snapshot that may stay in memory.
    pub activation_budget: u64,
    /// `(samples, tokens per sample)` of a calibrated run.
    pub calibration: Option<(usize, usize)>,
}

impl Prepared {
    /// The target server and serving dtype, and the `deq_scale` dtype they decided when the plan has static
    /// W8A8 linears: `lamina plan` and `lamina quant` say it.
    pub fn serving_note(&self) -> String {
        if self.save_format == SaveFormat::CompressedTensors {
            return "vLLM and transformers (--save_format compressed-tensors)".into();
        }
        let statics = self.plan.outputs().any(|o| o.meta.name.ends_with(".deq_scale"));
        let deq = match rules::deq_scale_dtype(self.serving) {
            Some(d) if statics => format!("; static W8A8 deq_scale stored as {}", d.name()),
            _ => String::new(),
        };
        format!(
            "{} (--target {}), served in {} (--serving_dtype){deq}",
            self.target.server(),
            self.target.name(),
            self.serving.torch_name()
        )
    }
}

/// Opens the model (or its config alone), picks the recipe and plans the run.
pub fn prepare(args: &QuantArgs) -> Result<Prepared> {
    crate::device::open(&args.device)?;
    // A config.json alone (or a folder without weights, for `plan`) is planned on paper.
    let on_paper = args.model_path.is_file()
        || (args.save_path.is_none() && args.model_path.is_dir() && !has_weights(&args.model_path));
    let (mut config, ckpt) = if on_paper {
        (checkpoint::read_config(&args.model_path)?, None)
    } else {
        let c = Checkpoint::open(&args.model_path)?;
        (c.config.clone(), Some(c))
    };
    if args.model_path.is_dir() {
        crate::data::calib::complete_image_tokens(&args.model_path, &mut config)?;
    }
    let names: Vec<&str> = ckpt.as_ref().map(|c| c.names().collect()).unwrap_or_default();
    let config_file =
        if args.model_path.is_file() { args.model_path.clone() } else { args.model_path.join(checkpoint::CONFIG) };
    let model = Model::new(&config, args.model_type.as_deref(), &names)
        .with_context(|| format!("cannot tell the architecture of {}", config_file.display()))?;
    let inventory: Vec<TensorMeta> = match &ckpt {
        Some(c) => c.names().map(|n| c.entry(n).unwrap().1.meta()).collect(),
        None => paper_inventory(&model)?,
    };
    let bundled_quant_type = match &args.config_path {
        Some(_) => None,
        None => Some(normalize_quant_type(args.quant_type.as_deref().with_context(|| {
            format!("give --quant_type ({}) or --config_path", crate::quant::recipe::QUANT_TYPES.join(", "))
        })?)),
    };
    // Recipes are chosen per server: the Ascend target's name, or the format's for compressed-tensors.
    let server = match args.save_format {
        SaveFormat::Ascend => args.target.name(),
        SaveFormat::CompressedTensors => SaveFormat::CompressedTensors.name(),
    };
    let recipe = match (&args.config_path, &bundled_quant_type) {
        (Some(p), _) => Recipe::from_file(p)?,
        (None, Some(qt)) => Recipe::bundled(model.family.model_type(), qt, server)?,
        (None, None) => unreachable!(),
    };
    let source_dtype = match &ckpt {
        Some(c) => crate::model::config::torch_dtype(&config).unwrap_or_else(|| c.main_float_dtype()),
        None => crate::model::config::torch_dtype(&config).unwrap_or(DType::BF16),
    };
    let serving = args.serving_dtype.unwrap_or(source_dtype);
    let units = build_units(&model, &inventory)
        .map_err(|e| in_its_file(e, ckpt.as_ref()))
        .with_context(|| format!("grouping the tensors of {}", args.model_path.display()))?;
    let calibrated = needs_calibration(&recipe, &units)?;
    let (exporter, mut units): (Box<dyn Exporter>, _) = match args.save_format {
        SaveFormat::Ascend => {
            let exporter = AscendExporter { serving, target: args.target };
            let units = plan_units(&model, units, &recipe, &exporter, calibrated)?;
            let setting = Setting {
                target: args.target,
                model_type: config_model_type(&config, &model),
                serving: Some(serving),
                kv_channels: Some(model.text.num_kv_heads * model.text.head_dim),
                head_dim: Some(model.text.head_dim),
            };
            check_loadable(&model, &units, &recipe, &exporter, &setting, bundled_quant_type.as_deref(), &inventory)?;
            (Box::new(exporter), units)
        }
        SaveFormat::CompressedTensors => {
            let exporter = CtExporter { roots: model.layout.roots() };
            let units = plan_units(&model, units, &recipe, &exporter, calibrated)
                .context("planning the compressed-tensors output")?;
            check_compressed_tensors(&model, &units, &recipe)?;
            (Box::new(exporter), units)
        }
    };
    let budget = args.memory_budget.map(gib).unwrap_or_else(memory::available);
    let activation_budget = if calibrated { calibration_memory(&model, &recipe, &mut units, args, budget)? } else { 0 };
    let part = part_file_size(args, &recipe);
    if !(part >= 0.0 && part.is_finite()) {
        bail!("--part_file_size must be a non-negative number of GiB, not {part}");
    }
    let limit = (part > 0.0).then(|| gib(part).max(1));
    let outputs: Vec<TensorMeta> = units.iter().flat_map(|u| u.outputs.iter().map(|o| o.meta.clone())).collect();
    let shards = ShardLayout::plan(&outputs, limit, &|k, n| exporter.weights_file(k, n))?;
    let memory = plan_memory(&units, budget);
    let calibration = calibrated.then_some((args.calib_samples, args.calib_seq_len));
    Ok(Prepared {
        plan: Plan { model, recipe, units, shards, memory },
        ckpt,
        exporter,
        save_format: args.save_format,
        target: args.target,
        serving,
        calibrated,
        activation_budget,
        calibration,
    })
}

/// Decides every unit's jobs and outputs (calibrating recipes add the tensors calibration computes).
fn plan_units(
    model: &Model,
    mut units: Vec<crate::model::Unit>,
    recipe: &Recipe,
    exporter: &dyn Exporter,
    calibrated: bool,
) -> Result<Vec<plan::UnitPlan>> {
    if calibrated {
        let embed = units.iter().flat_map(|u| u.tensors.iter()).find(|t| t.name() == model.layout.embed_tokens());
        let embed = embed.map(|t| t.meta.clone());
        for u in &mut units {
            u.tensors.extend(calibrate::planned_additions(model, recipe, u, embed.as_ref())?);
            u.tensors.sort_by(|a, b| a.name().cmp(b.name()));
        }
    }
    let planned: Vec<plan::UnitPlan> = units
        .into_iter()
        .map(|u| {
            let kv = kv_cache_jobs(model, &u, recipe)?;
            plan_unit(u, recipe, exporter, kv)
        })
        .collect::<Result<_>>()?;
    let kv_jobs = planned.iter().flat_map(|u| u.jobs.iter()).filter(|j| matches!(j, plan::Job::KvCache { .. }));
    if recipe.has_kv_cache() && kv_jobs.count() == 0 {
        bail!(
            "recipe {} quantizes the KV cache (dynamic_cache), but no attention module of this {} model matches its include patterns or has a key/value cache C8 can describe",
            recipe.name,
            model.family.model_type()
        );
    }
    Ok(planned)
}

/// The KV-cache jobs of a decoder layer: one per attention module of its graph (`self_attn`) whose cache a
/// `dynamic_cache` step of the recipe quantizes. C8 names its scales after `k_proj` and `v_proj`, so an
/// attention without them (MLA caches one compressed latent, which vLLM-Ascend quantizes as FAKQuant) is
/// refused.
fn kv_cache_jobs(model: &Model, unit: &crate::model::Unit, recipe: &Recipe) -> Result<Vec<plan::Job>> {
    let crate::model::layout::UnitKind::TextLayer(i) = unit.kind else { return Ok(Vec::new()) };
    let prefix = model.layout.unit_prefix(unit.kind);
    let mut jobs = Vec::new();
    for m in crate::model::decoder::graph(model, i).kv_cache {
        let module = format!("{prefix}{m}");
        let Some(spec) = recipe.kv_cache(&module) else { continue };
        ensure!(
            model.text.cla_share_factor == 1,
            "{module}: recipe {} quantizes its KV cache (dynamic_cache), but this model shares keys and values \
             across layers (use_cla, cla_share_factor {}): how a server caches the layers that reuse them is not \
             known to lamina, so C8 is refused for it; use a type without C8",
            recipe.name,
            model.text.cla_share_factor
        );
        let rows = |proj: &str| {
            let name = format!("{module}.{proj}.weight");
            unit.tensors.iter().find(|t| t.name() == name).map(|t| t.meta.shape[0])
        };
        let (Some(k_channels), Some(v_channels)) = (rows("k_proj"), rows("v_proj")) else {
            bail!(
                "{module}: recipe {} quantizes its KV cache (dynamic_cache), but C8 stores the scales of k_proj and v_proj and this attention has none (MLA caches a compressed latent: vLLM-Ascend quantizes it as FAKQuant, which lamina does not write)",
                recipe.name
            );
        };
        jobs.push(plan::Job::KvCache { module, k_channels, v_channels, spec });
    }
    Ok(jobs)
}

/// config.json's `model_type` as the server sees it (the top-level one of a VL model).
fn config_model_type(config: &serde_json::Value, model: &Model) -> String {
    config.get("model_type").and_then(|v| v.as_str()).unwrap_or(model.family.model_type()).to_string()
}

/// Refuses, before anything is written, a plan the target's loader would refuse ([`rules::check`] on the
/// planned tensors), and a bundled `--quant_type` whose scheme the recipe could give to no linear of this
/// model because the target does not load it there. The message lists the quant types that do load.
fn check_loadable(
    model: &Model,
    units: &[plan::UnitPlan],
    recipe: &Recipe,
    exporter: &AscendExporter,
    setting: &Setting,
    bundled_quant_type: Option<&str>,
    inventory: &[TensorMeta],
) -> Result<()> {
    let target = setting.target;
    if target == Target::VllmAscend && model.family == crate::model::layout::Family::Hunyuan {
        bail!(
            "Hunyuan-Large (model_type hunyuan, HunYuanForCausalLM) is not served by vLLM-Ascend, whatever the \
             quantization: vLLM's model registry (model_executor/models/registry.py), whose model classes \
             vLLM-Ascend serves, maps HunYuanMoEV1ForCausalLM and HunYuanDenseV1ForCausalLM to hunyuan_v1.py but \
             has no HunYuanForCausalLM, and vLLM-Ascend's packed_modules_model_mapping has no hunyuan row for \
             quantized experts. Nothing was written: use --target mindie (MindIE's atb_llm hunyuan model reads the \
             cross-layer attention layers' q_proj alone)"
        );
    }
    if target == Target::VllmAscend {
        let asymmetric = units.iter().flat_map(|u| u.jobs.iter()).find_map(|j| match j {
            plan::Job::KvCache { module, spec, .. } if !spec.symmetric => Some(module),
            _ => None,
        });
        if let Some(m) = asymmetric {
            bail!(
                "{m}: recipe {} quantizes the KV cache asymmetrically, but vLLM-Ascend's C8 decode dequantizes with the scale alone (attention_v1.py, \"Scale-only dequant\"), so nothing was written: use symmetric: true, or --target mindie",
                recipe.name
            );
        }
    }
    let outputs: Vec<crate::export::OutMeta> = units.iter().flat_map(|u| u.outputs.iter().cloned()).collect();
    let specs: Vec<crate::quant::QuantSpec> = units
        .iter()
        .flat_map(|u| u.jobs.iter())
        .filter_map(|j| if let plan::Job::Quantize { spec, .. } = j { Some(*spec) } else { None })
        .collect();
    let planned =
        Described::planned(&outputs, exporter.globals(&outputs, &specs)).with_lookup_aliases(&setting.model_type)?;
    let problems = rules::check(&planned, setting);
    let mut why = if problems.is_empty() { None } else { Some(rules::report(&problems)) };
    if let (None, Some(qt)) = (&why, bundled_quant_type) {
        let headline = headline_type(qt);
        if let Some(h) = headline.filter(|h| !outputs.iter().any(|o| o.kind == *h)) {
            let r = rules::rule(h).expect("every preset type has a rule");
            let kinds: Vec<&str> = [rules::LayerKind::Linear, rules::LayerKind::Expert]
                .into_iter()
                .filter(|k| r.loads(target, *k))
                .map(|k| k.describe())
                .collect();
            why = Some(format!(
                "- {} loads {h} only for {}s ({}), and {} has none: the bundled recipe {} would give {h} to no linear",
                target.server(),
                kinds.join(" and "),
                r.source,
                model.family.model_type(),
                recipe.name
            ));
        }
    }
    let Some(why) = why else { return Ok(()) };
    let loads = bundled_quant_types_that_load(model, setting, exporter, inventory);
    let mut hint = String::new();
    if bundled_quant_type.is_some() {
        hint = match loads.is_empty() {
            true => format!("\nno bundled --quant_type loads in {} for this model", target.server()),
            false => format!("\n--quant_type values whose bundled recipe loads here: {}", loads.join(", ")),
        };
    }
    if target == Target::VllmAscend {
        let mindie = Setting { target: Target::MindIe, ..setting.clone() };
        let mindie_exporter = AscendExporter { serving: exporter.serving, target: Target::MindIe };
        let more: Vec<String> = bundled_quant_types_that_load(model, &mindie, &mindie_exporter, inventory)
            .into_iter()
            .filter(|q| !loads.contains(q))
            .collect();
        if !more.is_empty() {
            hint.push_str(&format!(
                "\nwith --target mindie (MindIE reads dense 4-bit linears and per-group int8 scales) also: {}",
                more.join(", ")
            ));
        }
    }
    bail!(
        "{} quantized with recipe {} would not load in {} (--target {}), so nothing was written:\n{why}{hint}",
        model.family.model_type(),
        recipe.name,
        target.server(),
        target.name()
    )
}

/// The type a bundled `--quant_type` is named after (`w8a8c8`: W8A8), which the output must hold.
fn headline_type(quant_type: &str) -> Option<&'static str> {
    let base = crate::quant::recipe::c8_base(quant_type).unwrap_or(quant_type);
    crate::quant::QuantSpec::preset(base).map(|s| s.ascend_type())
}

/// The bundled `--quant_type` values whose recipe plans an output the target loads, for messages.
fn bundled_quant_types_that_load(
    model: &Model,
    setting: &Setting,
    exporter: &AscendExporter,
    inventory: &[TensorMeta],
) -> Vec<String> {
    let mut ok = Vec::new();
    for qt in crate::quant::recipe::QUANT_TYPES {
        let attempt = || -> Result<bool> {
            let recipe = Recipe::bundled(model.family.model_type(), qt, setting.target.name())?;
            let units = build_units(model, inventory)?;
            let calibrated = needs_calibration(&recipe, &units)?;
            let units = plan_units(model, units, &recipe, exporter, calibrated)?;
            let outputs: Vec<_> = units.iter().flat_map(|u| u.outputs.iter().cloned()).collect();
            let specs: Vec<_> = units
                .iter()
                .flat_map(|u| u.jobs.iter())
                .filter_map(|j| if let plan::Job::Quantize { spec, .. } = j { Some(*spec) } else { None })
                .collect();
            let headline = headline_type(qt);
            let present = headline.is_none_or(|h| outputs.iter().any(|o| o.kind == h));
            let described = Described::planned(&outputs, exporter.globals(&outputs, &specs))
                .with_lookup_aliases(&setting.model_type)?;
            Ok(present && rules::check(&described, setting).is_empty())
        };
        if attempt().unwrap_or(false) {
            ok.push(qt.to_string());
        }
    }
    ok
}

/// Refuses a compressed-tensors plan the format cannot hold (see [`crate::export::compressed_tensors`]).
fn check_compressed_tensors(model: &Model, units: &[plan::UnitPlan], recipe: &Recipe) -> Result<()> {
    let linears: Vec<(String, crate::quant::QuantSpec)> = units
        .iter()
        .flat_map(|u| u.jobs.iter())
        .filter_map(
            |j| if let plan::Job::Quantize { module, spec, .. } = j { Some((module.clone(), *spec)) } else { None },
        )
        .collect();
    let computed: Vec<String> = units
        .iter()
        .flat_map(|u| u.unit.tensors.iter())
        .filter(|t| matches!(t.source, crate::model::Source::Computed(_)))
        .map(|t| t.name().to_string())
        .collect();
    let shift = calibrate::smoothing::Smoothing::from_recipe(recipe)?.is_some_and(|s| s.cfg.shift);
    let mut problems = crate::export::compressed_tensors::plan_problems(&linears, &computed, shift);
    if units.iter().flat_map(|u| u.jobs.iter()).any(|j| matches!(j, plan::Job::KvCache { .. })) {
        problems.push(
            "the recipe quantizes the KV cache (dynamic_cache, C8): compressed-tensors describes KV-cache quantization as per-tensor k_scale / v_scale of the attention (kv_cache_scheme), which lamina does not write; use the Ascend format".to_string(),
        );
    }
    if !problems.is_empty() {
        bail!(
            "{} quantized with recipe {} cannot be written as compressed-tensors, so nothing was written:\n- {}",
            model.family.model_type(),
            recipe.name,
            problems.join("\n- ")
        );
    }
    Ok(())
}

/// Names the file of the tensor an error is about ([`crate::model::TensorError`]).
fn in_its_file(e: anyhow::Error, ckpt: Option<&Checkpoint>) -> anyhow::Error {
    let file = e
        .downcast_ref::<crate::model::TensorError>()
        .and_then(|t| ckpt?.entry(&t.tensor))
        .map(|(f, _)| f.path.display().to_string());
    match file {
        Some(f) => e.context(format!("in {f}")),
        None => e,
    }
}

/// Whether the recipe needs calibration data: a smoothing step, a KV-cache step, or a linear whose scheme
/// has a static activation range or GPTQ weights.
fn needs_calibration(recipe: &Recipe, units: &[crate::model::Unit]) -> Result<bool> {
    if recipe.has_kv_cache() {
        return Ok(true);
    }
    if calibrate::smoothing::Algorithms::from_recipe(recipe)?.any() {
        return Ok(true);
    }
    Ok(units
        .iter()
        .flat_map(|u| u.tensors.iter())
        .filter_map(|t| t.linear_module())
        .any(|m| recipe.linear_spec(m).is_some_and(|s| s.needs_calibration())))
}

/// Raises each calibrated unit's predicted need to what layer-wise calibration holds at once,
/// and returns how many bytes of activations may stay in memory (the rest spills to disk).
///
/// A decoder layer under calibration holds its weights widened to f32 about four times over
/// (the loaded weights, a layer built from them, the dequantized weights the quantized forward
/// runs, and the smoothed copy), the Hessians of GPTQ inputs with their factors, and one
/// sequence's working activations. A vision unit holds the same, and every image's activations
/// (in memory: a tower is small), counted for images of about 1024 patches (a 512×512 photograph
/// at patch size 16).
///
/// The routed experts of a MoE layer whose experts stream ([`calibrate::experts`]) are not held
/// with the layer: one group of them is, twice (loaded and dequantized), beside every sample's
/// expert input, the layer's output before the experts, and the experts' sums.
fn calibration_memory(
    model: &Model,
    recipe: &Recipe,
    units: &mut [plan::UnitPlan],
    args: &QuantArgs,
    budget: u64,
) -> Result<u64> {
    use crate::model::layout::UnitKind;
    let t = &model.text;
    let seq = args.calib_seq_len as u64;
    let widest = t.intermediate_size.max(t.hidden_size).max(t.num_heads * t.head_dim) as u64;
    let text_working = seq * (seq * 2 + widest * 8) * 4;
    let per_sample_state = seq * t.hidden_size as u64 * 4 + seq * 3 * 8;
    let activations = per_sample_state * args.calib_samples as u64;
    let vision_working = crate::model::config::vision_view(&model.config).map_or(0, |v| {
        let dim = v.usize(&["hidden_size", "embed_dim"]).unwrap_or(0) as u64;
        let inter = v.usize(&["intermediate_size"]).unwrap_or(4 * dim as usize) as u64;
        const PATCHES: u64 = 1024;
        // States, the copy a pass runs on, kept (deepstack) states; one image's working set.
        args.calib_samples as u64 * PATCHES * dim * 4 * 3 + PATCHES * (PATCHES * 2 + inter * 4) * 4
    });
    let mut peak = 0;
    for u in units.iter_mut() {
        let working = match u.unit.kind {
            UnitKind::TextLayer(_) | UnitKind::Embed => text_working,
            UnitKind::VisionPre | UnitKind::VisionBlock(_) | UnitKind::VisionPost => vision_working,
            _ => continue,
        };
        let streamed = calibrate::streamed_experts(model, recipe, u)?;
        let held = |x: &&crate::model::LogicalTensor| streamed.as_ref().is_none_or(|s| !s.holds(x));
        let widened = u.unit.tensors.iter().filter(held).map(|x| x.meta.numel() as u64 * 4).sum::<u64>();
        let experts = streamed.as_ref().map_or(0, |s| 2 * s.group_bytes() + 3 * activations);
        // One Hessian (and its factor) per distinct input: q/k/v share one, gate/up another.
        let prefix = model.layout.unit_prefix(u.unit.kind);
        let groups = match u.unit.kind {
            UnitKind::TextLayer(i) => crate::model::decoder::graph(model, i).input_groups(),
            _ => crate::model::decoder::InputGroups::default(),
        };
        let hessians: u64 = u
            .jobs
            .iter()
            .filter_map(|j| match j {
                plan::Job::Quantize { module, weight, spec, .. }
                    if spec.weight_method == crate::quant::spec::WeightMethod::Gptq =>
                {
                    Some((groups.of(module.strip_prefix(&prefix).unwrap_or(module)), weight.meta.shape[1] as u64))
                }
                _ => None,
            })
            .collect::<std::collections::BTreeMap<String, u64>>()
            .values()
            .map(|c| c * c * 4 * 2)
            .sum();
        u.peak_job = u.peak_job.max(4 * widened + hessians + working + experts);
        peak = peak.max(u.peak_job);
    }
    // Inputs and outputs of a unit: two snapshots.
    let room = budget.saturating_sub(plan::BASE_BYTES + peak);
    let cache = (2 * activations).min(room / 2);
    for u in units.iter_mut() {
        u.peak_job += cache;
    }
    Ok(cache / 2)
}

/// The shard size limit in GiB: the command line's, else the recipe's, else 4.
fn part_file_size(args: &QuantArgs, recipe: &Recipe) -> f64 {
    args.part_file_size.or(recipe.part_file_size).unwrap_or(4.0)
}

/// msModelSlim spells `w4a8` for what lamina calls `w4a8_dynamic`.
fn normalize_quant_type(q: &str) -> String {
    let q = q.to_ascii_lowercase().replace('-', "_");
    match q.as_str() {
        "w4a8" => "w4a8_dynamic".into(),
        _ => q,
    }
}

fn has_weights(dir: &Path) -> bool {
    dir.join(checkpoint::SINGLE).exists() || dir.join(checkpoint::INDEX).exists()
}

/// `lamina plan`: what would happen, without writing anything. Returns whether it fits.
pub fn print_plan(p: &Prepared) -> bool {
    let plan = &p.plan;
    let m = &plan.memory;
    let t = &plan.model.text;
    println!(
        "architecture : {} ({})",
        plan.model.family.model_type(),
        if p.ckpt.is_some() { "checkpoint" } else { "config.json only, on paper" }
    );
    print!(
        "text         : {} layers, hidden {}, {} heads / {} KV heads",
        t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads
    );
    if let Some(moe) = &t.moe {
        print!(", {} experts top-{} (moe_intermediate {})", moe.num_experts, moe.top_k, moe.moe_intermediate_size);
    }
    println!();
    println!("recipe       : {}", plan.recipe.name);
    println!("loads in     : {}", p.serving_note());
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for o in plan.outputs() {
        if o.meta.name.ends_with(".weight") || o.meta.name.ends_with(".weight_packed") {
            *kinds.entry(o.kind).or_default() += 1;
        }
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!("weights      : {}", kinds.join(", "));
    let c8 = plan.units.iter().flat_map(|u| u.jobs.iter()).filter(|j| matches!(j, plan::Job::KvCache { .. })).count();
    if c8 > 0 {
        println!("kv cache     : C8 (int8 per channel, calibrated) in {c8} attention layers");
    }
    println!("units        : {}", plan.units.len());
    for (i, u) in plan.units.iter().enumerate() {
        if plan.units.len() <= 12 || i < 4 || i + 3 >= plan.units.len() || i == m.largest_unit {
            println!(
                "  {:>4}  {:<48} in {:>10}  out {:>10}  peak {:>10}{}",
                i,
                u.unit.name,
                human(u.unit.stored_bytes),
                human(u.out_bytes),
                human(u.peak_job),
                if i == m.largest_unit { "  <- largest" } else { "" }
            );
        } else if i == 4 {
            println!("  ...");
        }
    }
    println!("bytes in     : {}", human(plan.bytes_in()));
    println!("bytes out    : {} in {} file(s)", human(plan.bytes_out()), plan.shards.files.len());
    println!(
        "memory       : predicted peak {} (largest unit {} + {} base + {} of outputs queued for the writer + {} read ahead); budget {}",
        human(m.peak),
        human(m.unit_peak),
        human(m.base),
        human(m.in_flight),
        human(m.read_ahead),
        human(m.budget)
    );
    let streamed =
        |i: usize| calibrate::streamed_experts(&plan.model, &plan.recipe, &plan.units[i]).is_ok_and(|s| s.is_some());
    let time = estimate::estimate(plan, p.calibration, &streamed, &crate::device::Cpu);
    println!("time         : {}", time.describe());
    if m.fits {
        println!("fits         : yes");
    } else {
        println!("fits         : NO, {}", shortfall(plan));
    }
    m.fits
}

fn shortfall(plan: &Plan) -> String {
    let m = &plan.memory;
    format!(
        "unit {} needs {} at its peak, {} with the process itself and the writer's queue, but the budget is {} (short by {})",
        plan.units[m.largest_unit].unit.name,
        human(m.unit_peak),
        human(m.peak),
        human(m.budget),
        human(m.peak.saturating_sub(m.budget))
    )
}

/// What a finished run reports.
#[derive(Debug)]
pub struct Summary {
    pub seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub peak_rss: u64,
    pub shards: usize,
    pub already_done: bool,
    pub resumed_from: usize,
    /// The server and serving dtype the output is for, and what that decided.
    pub serving: String,
}

/// `lamina quant`.
pub fn quantize(args: &QuantArgs) -> Result<Summary> {
    let started = Instant::now();
    let save = args.save_path.clone().context("--save_path is required")?;
    let p = prepare(args)?;
    let ckpt =
        p.ckpt.as_ref().with_context(|| format!("{} holds no weights to quantize", args.model_path.display()))?;
    let plan = &p.plan;
    if !plan.memory.fits {
        bail!("the run does not fit the memory budget: {}", shortfall(plan));
    }
    for u in &plan.units {
        crate::model::load::check_inputs(ckpt, &u.unit)?;
    }
    let calibration =
        if p.calibrated { Some(calibration_samples(args, ckpt, &plan.model, &plan.recipe)?) } else { None };
    let mut fingerprint = fingerprint(args, ckpt, plan)?;
    // The description records them: another target or serving dtype is another output.
    fingerprint["target"] = serde_json::json!(p.target.name());
    fingerprint["serving_dtype"] = serde_json::json!(p.serving.torch_name());
    fingerprint["format"] = serde_json::json!(p.exporter.format_name());
    if let Some(samples) = &calibration {
        let mut h = crc32fast::Hasher::new();
        for s in samples {
            h.update(&(s.ids.len() as u64).to_le_bytes());
            s.ids.iter().for_each(|id| h.update(&id.to_le_bytes()));
            if let Some(img) = &s.image {
                img.pixel_values.iter().for_each(|v| h.update(&v.to_le_bytes()));
            }
        }
        fingerprint["calibration"] = serde_json::json!({"samples": samples.len(), "tokens_crc32": h.finalize()});
    }
    let (history, _lock) =
        open_save_dir(&save, &args.model_path, &fingerprint, args.overwrite, p.exporter.as_ref(), plan)?;
    if history.as_ref().is_some_and(|h| h.complete) {
        return Ok(Summary {
            seconds: started.elapsed().as_secs_f64(),
            bytes_in: 0,
            bytes_out: 0,
            peak_rss: memory::peak_rss(),
            shards: plan.shards.files.len(),
            already_done: true,
            resumed_from: plan.units.len(),
            serving: p.serving_note(),
        });
    }
    let history = history.unwrap_or_default();
    let start = history.next_unit().min(plan.units.len());
    check_disk_space(&save, ckpt, plan, &history)?;

    let mut journal = Journal::append(&save)?;
    if history.fingerprint.is_none() {
        journal.record(&Event::Start { fingerprint })?;
    }
    let mut state = stages::WriteState {
        layout: &plan.shards,
        writer: ShardWriter::new(&save),
        journal,
        crcs: stages::crcs_from_history(plan, &history),
        committed: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(start)),
    };
    verify_finished_shards(&save, plan, &history, &mut state, start)?;
    if start > 0 {
        eprintln!(
            "resuming {} from unit {}/{} ({})",
            save.display(),
            start,
            plan.units.len(),
            plan.units.get(start).map_or("end", |u| u.unit.name.as_str())
        );
    }
    let mut progress = progress::Progress::new(plan.units.len() as u64, start as u64, "units");
    let device = crate::device::open(&args.device)?;
    let mut data_free = data_free::DataFree { ckpt, exporter: p.exporter.as_ref() };
    let mut calibrator;
    let processor: &mut dyn stages::UnitProcessor = match calibration {
        None => &mut data_free,
        Some(samples) => {
            calibrator = calibrate::Calibrator::new(
                ckpt,
                &plan.model,
                &plan.recipe,
                p.exporter.as_ref(),
                device.as_ref(),
                samples,
                save.clone(),
                p.activation_budget,
                state.committed.clone(),
            )?;
            calibrator.resume(&plan.units, start)?;
            &mut calibrator
        }
    };
    stages::run(plan, ckpt, processor, &mut state, start, &mut progress)?;
    progress.finish();
    for k in 0..plan.shards.files.len() {
        state.writer.publish(&plan.shards, k)?;
    }
    state.writer.sync_dir();
    write_metadata(&save, ckpt, plan, p.exporter.as_ref())?;
    state.journal.record(&Event::Complete)?;
    let _ = std::fs::remove_dir_all(save.join(activations::DIR));
    Ok(Summary {
        seconds: started.elapsed().as_secs_f64(),
        bytes_in: plan.units[start..].iter().map(|u| u.unit.stored_bytes).sum(),
        bytes_out: plan.units[start..].iter().map(|u| u.out_bytes).sum(),
        peak_rss: memory::peak_rss(),
        shards: plan.shards.files.len(),
        already_done: false,
        resumed_from: start,
        serving: p.serving_note(),
    })
}

/// Where the bundled calibration set lives: `LAMINA_CALIB_DIR`, a `calib/` folder beside the
/// executable's folder, or the source checkout's.
pub fn default_calib_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LAMINA_CALIB_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::current_exe().ok().and_then(|e| e.parent()?.parent().map(|p| p.join("calib"))) {
        if d.is_dir() {
            return d;
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/calib"))
}

/// msModelSlim's prompt for a calibration image that comes without one.
pub const DEFAULT_IMAGE_PROMPT: &str = "Describe this image in detail.";

/// The calibration sequences: `--calib_data`, else the bundled set (`calib/`: its photographs
/// and prompts for vision-language models, its text corpus for the others). For a
/// vision-language model a folder, or a JSON listing with images, is an image set (see
/// [`crate::data::calib`]); a text file or a listing without images is text.
fn calibration_samples(
    args: &QuantArgs,
    ckpt: &Checkpoint,
    model: &Model,
    recipe: &Recipe,
) -> Result<Vec<calibrate::CalibSample>> {
    let vision_language = model.family.is_vision_language();
    let path = match &args.calib_data {
        Some(p) => p.clone(),
        None if vision_language => default_calib_dir(),
        None => default_calib_dir().join("text/corpus.txt"),
    };
    if !path.exists() {
        bail!("no such calibration file or folder: {}", path.display());
    }
    let context = || format!("reading the calibration data {}", path.display());
    if vision_language && is_image_set(&path).with_context(context)? {
        let prompt = recipe.default_text.as_deref().unwrap_or(DEFAULT_IMAGE_PROMPT);
        let mut samples = crate::data::calib::load_vision(&ckpt.dir, &path, prompt).with_context(context)?;
        samples.truncate(args.calib_samples);
        return Ok(samples
            .into_iter()
            .map(|s| {
                let image = crate::model::vision::VisionInput {
                    pixel_values: ndarray::ArrayD::from_shape_vec(s.pixel_shape, s.pixel_values)
                        .expect("the processor's shape fits its values"),
                    image_grid_thw: s.image_grid_thw.map(|g| vec![g.map(|x| x as usize)]).unwrap_or_default(),
                };
                calibrate::CalibSample { ids: s.input_ids, image: Some(image) }
            })
            .collect());
    }
    let ids =
        crate::data::calib::load_text(&ckpt.dir, &path, args.calib_samples, args.calib_seq_len, model.text.vocab_size)
            .with_context(context)?;
    Ok(ids.into_iter().map(|ids| calibrate::CalibSample { ids, image: None }).collect())
}

/// A folder, or a `.json`/`.jsonl` listing some record of which names an image.
fn is_image_set(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(true);
    }
    let json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json") || e.eq_ignore_ascii_case("jsonl"));
    Ok(json && crate::data::calib::read_records(path)?.iter().any(|r| r.image.is_some()))
}

/// What decides the output bytes: a rerun must match it to resume.
fn fingerprint(args: &QuantArgs, ckpt: &Checkpoint, plan: &Plan) -> Result<serde_json::Value> {
    let mut inputs = serde_json::Map::new();
    for f in &ckpt.files {
        let md = std::fs::metadata(&f.path)?;
        let mtime =
            md.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
        inputs.insert(f.path.file_name().unwrap().to_string_lossy().into(), serde_json::json!([md.len(), mtime]));
    }
    Ok(serde_json::json!({
        "lamina": env!("CARGO_PKG_VERSION"),
        "model_path": std::fs::canonicalize(&args.model_path)?.display().to_string(),
        "model_files": inputs,
        "model_type": plan.model.family.model_type(),
        "quant_type": plan.recipe.quant_type,
        "recipe": plan.recipe.text,
        "part_file_size": part_file_size(args, &plan.recipe),
        "shards": plan.shards.files.iter().map(|f| &f.name).collect::<Vec<_>>(),
        // The headers fix every tensor's name, type, shape and place in its file.
        "shard_headers_crc32": plan.shards.files.iter().fold(crc32fast::Hasher::new(), |mut h, f| {
            h.update(&f.header);
            h
        }).finalize(),
    }))
}

/// The files lamina writes into a save folder (besides the model's companion files).
/// Both formats' files count: `--overwrite` with another `--save_format` leaves no mix of the two.
fn is_lamina_output(name: &str, exporter: &dyn Exporter) -> bool {
    let ascend = AscendExporter { serving: DType::BF16, target: Target::VllmAscend };
    let ct = CtExporter { roots: Vec::new() };
    name == JOURNAL
        || exporter.is_output_file(name)
        || ascend.is_output_file(name)
        || ct.is_output_file(name)
        || (name.starts_with('.') && name.ends_with(".partial"))
}

/// Checks the save folder, takes its lock (held until the returned guard drops: a second run on the
/// folder fails at once and changes nothing) and reads what an earlier run left there.
fn open_save_dir(
    save: &Path,
    model_dir: &Path,
    fingerprint: &serde_json::Value,
    overwrite: bool,
    exporter: &dyn Exporter,
    plan: &Plan,
) -> Result<(Option<History>, crate::io::lock::FolderLock)> {
    if save.exists() && !save.is_dir() {
        bail!("save path {} exists and is not a folder", save.display());
    }
    if model_dir.canonicalize().ok().is_some_and(|m| save.canonicalize().is_ok_and(|s| s == m)) {
        bail!("save path {} is the model folder itself; give another folder", save.display());
    }
    std::fs::create_dir_all(save).with_context(|| format!("cannot create the save folder {}", save.display()))?;
    let probe = save.join(".lamina-write-test");
    std::fs::write(&probe, b"").with_context(|| format!("the save folder {} is not writable", save.display()))?;
    let _ = std::fs::remove_file(&probe);
    let _ = plan;
    let lock = crate::io::lock::lock(save)?;

    if overwrite {
        for e in std::fs::read_dir(save)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if is_lamina_output(&name, exporter) {
                std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            }
        }
        return Ok((None, lock));
    }
    match Journal::read(save)? {
        Some(h) => {
            if let Some(old) = &h.fingerprint {
                if old != fingerprint {
                    let keys = fingerprint_diff(old, fingerprint);
                    let shown: Vec<String> =
                        keys.iter().map(|k| describe_change(k, &old[k], &fingerprint[k])).collect();
                    bail!(
                        "{} holds {} run with different inputs or arguments (differs in: {}); pass --overwrite to start over",
                        save.display(),
                        if h.complete { "the finished output of a" } else { "an unfinished" },
                        shown.join("; ")
                    );
                }
            }
            Ok((Some(h), lock))
        }
        None => {
            let leftovers: Vec<String> = std::fs::read_dir(save)?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| is_lamina_output(n, exporter))
                .collect();
            if !leftovers.is_empty() {
                bail!(
                    "{} already holds quantized output ({}) that no lamina journal describes; pass --overwrite to replace it",
                    save.display(),
                    leftovers.join(", ")
                );
            }
            Ok((None, lock))
        }
    }
}

/// `key` alone, or `key: old -> new` when both values are short.
fn describe_change(key: &str, old: &serde_json::Value, new: &serde_json::Value) -> String {
    let short = |v: &serde_json::Value| !v.is_object() && !v.is_array() && v.to_string().len() <= 40;
    if short(old) && short(new) {
        format!("{key}: {old} -> {new}")
    } else {
        key.to_string()
    }
}

/// Refuses to start when the disk cannot hold what is left to write: the shards not yet written
/// and the metadata files (config, companions, description, index, journal).
fn check_disk_space(save: &Path, ckpt: &Checkpoint, plan: &Plan, h: &History) -> Result<()> {
    let shards = &plan.shards;
    let mut need = 0u64;
    for (k, f) in shards.files.iter().enumerate() {
        if h.shards.contains_key(&k) {
            continue;
        }
        let allocated = std::fs::metadata(partial_path(save, &f.name))
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        need += f.total_len.saturating_sub(allocated);
    }
    need += metadata_bytes(ckpt, plan)?;
    let free = free_space(save)?;
    if need > free {
        bail!(
            "not enough disk space in {}: the output needs {} more but only {} is free (short by {}); free some space and run the same command again",
            save.display(),
            human(need),
            human(free),
            human(need - free)
        );
    }
    Ok(())
}

/// A generous estimate of the bytes of everything but the shards.
fn metadata_bytes(ckpt: &Checkpoint, plan: &Plan) -> Result<u64> {
    let mut n = std::fs::metadata(ckpt.dir.join(checkpoint::CONFIG)).map_or(0, |m| m.len());
    for f in ckpt.companion_files()? {
        n += std::fs::metadata(&f).map_or(0, |m| m.len());
    }
    // Each tensor appears in the description, the index and the journal: a name and a little more.
    let per_tensor: u64 = plan.outputs().map(|o| 3 * (o.meta.name.len() as u64 + 48)).sum();
    Ok(n + per_tensor + 64 * 1024)
}

fn free_space(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` is a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read free space of {}", dir.display()));
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// On resume: every shard an earlier run finished must still be there with its checksum (under
/// its hidden name, or its final one if that run stopped while publishing), and a shard whose
/// units all finished but whose completion was not yet recorded is finished now.
fn verify_finished_shards(
    save: &Path,
    plan: &Plan,
    h: &History,
    st: &mut stages::WriteState,
    start: usize,
) -> Result<()> {
    for (k, f) in plan.shards.files.iter().enumerate() {
        let (partial, published) = (partial_path(save, &f.name), save.join(&f.name));
        if let Some((_, crc)) = h.shards.get(&k) {
            let path = [&partial, &published].into_iter().find(|p| p.exists());
            let actual = path.map(|p| file_crc32(p)).transpose()?;
            if actual != Some(*crc) {
                bail!(
                    "{} was finished by an earlier run but is now {}; pass --overwrite to start over",
                    path.unwrap_or(&partial).display(),
                    if actual.is_none() { "missing" } else { "changed" }
                );
            }
            continue;
        }
        let shard_of = |o: &crate::export::OutMeta| st.layout.location(&o.meta.name).unwrap().shard;
        let units_done = plan.units[..start].iter().any(|u| u.outputs.iter().any(|o| shard_of(o) == k));
        let all_done = plan.units[start..].iter().all(|u| u.outputs.iter().all(|o| shard_of(o) != k));
        if units_done && !partial.exists() {
            bail!(
                "{} is missing though the journal says part of it was written; pass --overwrite to start over",
                partial.display()
            );
        }
        if units_done && all_done {
            stages::finish_shard(st, k)?;
        }
    }
    Ok(())
}

/// The shard index, config.json, companion files and, last, the description that marks the
/// output complete.
fn write_metadata(save: &Path, ckpt: &Checkpoint, plan: &Plan, exporter: &dyn Exporter) -> Result<()> {
    if plan.shards.files.len() > 1 {
        write_atomically(&save.join(exporter.index_file()), &plan.shards.index_json()?)?;
    }
    for f in ckpt.companion_files()? {
        let bytes = std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?;
        write_atomically(&save.join(f.file_name().unwrap()), &bytes)?;
    }
    let outputs: Vec<_> = plan.outputs().cloned().collect();
    let mut config = ckpt.config.clone();
    if calibrate::unties_embeddings(&plan.model, &plan.recipe)? {
        // The rotated head is its own tensor now (see calibrate::quarot).
        if let Some(o) = config.as_object_mut() {
            o.insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
            if let Some(t) = o.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                t.insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
            }
        }
    }
    let rotation = match calibrate::smoothing::Algorithms::from_recipe(&plan.recipe)?.quarot {
        Some(q) if q.export => Some(q.rotations(&plan.model)?.residual.matrix()),
        _ => None,
    };
    let files = exporter.metadata_files(
        &config,
        &outputs,
        &plan.linears(),
        &plan.float_linears(),
        rotation.as_ref().map(|q| q.view()),
    )?;
    for (name, bytes) in files {
        let path = save.join(&name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        write_atomically(&path, &bytes)?;
    }
    Ok(())
}
