//! The engine of the rules: an output as the rules see it ([`Described`]), what it is checked against
//! ([`Setting`]), and the checks, each a function that reads the tables of the parent module and adds
//! [`Problem`]s.

use super::*;

/// What the rules are checked against besides the output itself.
#[derive(Debug, Clone)]
pub struct Setting {
    pub target: Target,
    /// config.json's `model_type` (the fused-module table is keyed by it).
    pub model_type: String,
    /// The dtype the server runs in: it decides `deq_scale`'s dtype. `None`: unknown, either is accepted.
    pub serving: Option<DType>,
    /// `num_key_value_heads × head_dim`: the channels of a C8 scale.
    pub kv_channels: Option<usize>,
    /// The attention head size (C8 on vLLM-Ascend needs it to divide by 32, [`c8_head_limit`]).
    pub head_dim: Option<usize>,
}

/// An output as the rules see it: every tensor's description type, the description's global keys, and
/// the tensors' headers.
#[derive(Debug, Clone, Default)]
pub struct Described {
    pub types: BTreeMap<String, String>,
    pub globals: Map<String, Value>,
    pub tensors: BTreeMap<String, TensorMeta>,
}

/// Keys of the description that are not tensors.
pub const GLOBAL_KEYS: [&str; 14] = [
    "model_quant_type",
    "model_quant_type_second",
    "version",
    "group_size",
    "metadata",
    "optional",
    "kv_cache_type",
    "kv_quant_type",
    "kv_cache_type_second",
    "fa_quant_type",
    "indexer_quant_type",
    "reduce_quant_type",
    "ascend_quant_method",
    "quant_method",
];

impl Described {
    /// Splits a description into tensor types and global keys (per-layer attention quantization
    /// keys `….quant_type` count as global).
    pub fn from_description(desc: &Map<String, Value>, tensors: BTreeMap<String, TensorMeta>) -> Described {
        let mut d = Described { tensors, ..Default::default() };
        for (k, v) in desc {
            match v.as_str() {
                Some(s) if !GLOBAL_KEYS.contains(&k.as_str()) && !k.ends_with(".quant_type") => {
                    d.types.insert(k.clone(), s.to_string());
                }
                _ => {
                    d.globals.insert(k.clone(), v.clone());
                }
            }
        }
        d
    }

    /// The same with the alias entries the loader of `model_type` looks up ([`lookup_aliases`]),
    /// as the Ascend writer adds them.
    pub fn with_lookup_aliases(mut self, model_type: &str) -> Result<Described> {
        let stored = self.types.iter().map(|(n, k)| (n.as_str(), k.as_str()));
        let aliases = lookup_alias_entries(model_type, stored)?;
        self.types.extend(aliases);
        Ok(self)
    }

    /// What `lamina quant` plans to write.
    pub fn planned(outputs: &[OutMeta], globals: Map<String, Value>) -> Described {
        Described {
            types: outputs.iter().map(|o| (o.meta.name.clone(), o.kind.to_string())).collect(),
            globals,
            tensors: outputs.iter().map(|o| (o.meta.name.clone(), o.meta.clone())).collect(),
        }
    }

    pub fn group_size(&self) -> usize {
        self.globals.get("group_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize
    }

    pub fn c8(&self) -> bool {
        self.globals.get("kv_cache_type").and_then(|v| v.as_str()) == Some("C8")
    }
}

/// One way an output would not load.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// A short name of the rule broken.
    pub rule: &'static str,
    /// The tensor, linear or fused group concerned.
    pub subject: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [{}]", self.subject, self.detail, self.rule)
    }
}

fn problem(rule: &'static str, subject: impl Into<String>, detail: impl Into<String>) -> Problem {
    Problem { rule, subject: subject.into(), detail: detail.into() }
}

/// One quantized linear found in a description.
#[derive(Debug)]
struct Module<'a> {
    name: String,
    rule: &'static TypeRule,
    /// suffix → header (present tensors only).
    tensors: BTreeMap<&'a str, &'a TensorMeta>,
}

/// Lists every problem, in a stable order. An empty list means the target's loader accepts the output
/// as far as names, types, dtypes and shapes go ([`check_values`] looks at the numbers).
pub fn check(d: &Described, s: &Setting) -> Vec<Problem> {
    let mut out = Vec::new();
    described_and_present(d, s, &mut out);
    check_lookups(d, s, &mut out);
    let modules = modules(d, &mut out);
    for m in modules.values() {
        check_module(m, d, s, &mut out);
    }
    check_groups(&modules, d, s, &mut out);
    check_fused(d, s, &mut out);
    check_float_only(d, s, &mut out);
    check_c8(d, s, &mut out);
    check_globals(&modules, d, &mut out);
    out.sort();
    out.dedup();
    out
}

/// Linears the target's model class builds unquantized ([`FLOAT_ONLY`]) must be described FLOAT.
fn check_float_only(d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    if s.target != Target::VllmAscend {
        return;
    }
    for (name, kind) in &d.types {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        if kind == FLOAT || !d.tensors.contains_key(name) {
            continue;
        }
        if let Some(f) = float_only(&s.model_type, module) {
            out.push(problem(
                "float-only",
                module,
                format!("is {kind}, but must stay FLOAT for vLLM-Ascend (model_type {:?}): {}", s.model_type, f.why),
            ));
        }
    }
}

/// The loader's lookups under other names than the stored linears' ([`lookup_aliases`]): each must
/// be described, with the type of the linear it stands for.
fn check_lookups(d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    if s.target != Target::VllmAscend {
        return;
    }
    let stored = d.types.iter().filter(|(n, _)| d.tensors.contains_key(*n)).map(|(n, k)| (n.as_str(), k.as_str()));
    let wanted = match lookup_alias_entries(&s.model_type, stored) {
        Ok(w) => w,
        Err(e) => {
            out.push(problem("lookup", s.model_type.as_str(), format!("{e:#}")));
            return;
        }
    };
    for (key, kind) in wanted {
        match d.types.get(&key) {
            Some(k) if *k == kind => {}
            Some(k) => out.push(problem(
                "lookup",
                &key,
                format!("is described {k}, but the linear(s) vLLM serves under this name are {kind}"),
            )),
            None => out.push(problem(
                "lookup",
                &key,
                format!(
                    "is not described, but vLLM-Ascend looks the type of a stored {kind} linear up under this name (model_type {:?}: see rules::lookup_aliases); the load fails with a KeyError",
                    s.model_type
                ),
            )),
        }
    }
}

fn described_and_present(d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    let stored = d.types.iter().filter(|(n, _)| d.tensors.contains_key(*n)).map(|(n, k)| (n.as_str(), k.as_str()));
    let aliases = lookup_alias_entries(&s.model_type, stored).unwrap_or_default();
    for name in d.tensors.keys() {
        if !d.types.contains_key(name) {
            out.push(problem(
                "described",
                name,
                "is in the weights but not in quant_model_description.json (the loader looks every tensor's type up there)",
            ));
        }
    }
    for name in d.types.keys() {
        if !d.tensors.contains_key(name) && !aliases.contains_key(name) {
            out.push(problem("described", name, "is described but no weights file holds it"));
        }
    }
}

/// The quantized linears of a description, by module name.
fn modules<'a>(d: &'a Described, out: &mut Vec<Problem>) -> BTreeMap<String, Module<'a>> {
    let mut mods: BTreeMap<String, Module<'a>> = BTreeMap::new();
    let mut unknown: BTreeSet<(String, &str)> = BTreeSet::new();
    for (name, kind) in &d.types {
        // C8 tensors belong to the attention, whatever type names them (msModelSlim v0 used the linear's).
        if kind == FLOAT || kind == C8 || is_c8_tensor(name) {
            continue;
        }
        let Some(r) = rule(kind) else {
            unknown.insert((name.rsplit_once('.').map_or(name.as_str(), |p| p.0).to_string(), kind.as_str()));
            continue;
        };
        let Some((module, suffix)) = name.rsplit_once('.') else {
            out.push(problem("names", name, format!("{kind} tensors are named MODULE.SUFFIX")));
            continue;
        };
        let Some(known) = r.tensors.iter().find(|t| t.suffix == suffix).map(|t| t.suffix).or(
            // A linear's float bias may carry its type (msModelSlim's DUALSCALE does).
            (suffix == "bias").then_some("bias"),
        ) else {
            let names: Vec<&str> = r.tensors.iter().map(|t| t.suffix).collect();
            out.push(problem(
                "names",
                name,
                format!(
                    "is described as {kind}, whose linears have no tensor `{suffix}` ({} reads {}); it would be left without a parameter to load into",
                    r.source.split(':').next().unwrap_or(""),
                    names.join(", ")
                ),
            ));
            continue;
        };
        let Some(meta) = d.tensors.get(name) else { continue };
        let m = mods.entry(module.to_string()).or_insert_with(|| Module {
            name: module.to_string(),
            rule: r,
            tensors: BTreeMap::new(),
        });
        if m.rule.name != r.name {
            out.push(problem("types", module, format!("mixes tensors described as {} and {}", m.rule.name, r.name)));
        }
        m.tensors.insert(known, meta);
    }
    for (module, kind) in unknown {
        let known: Vec<&str> = TYPES.iter().map(|r| r.name).collect();
        out.push(problem(
            "types",
            module,
            format!(
                "has type {kind}, which lamina's rules do not know (known: {}, FLOAT, C8); its loader scheme cannot be checked",
                known.join(", ")
            ),
        ));
    }
    mods
}

/// `(out, in)` of a module from its weight tensor.
fn out_in(m: &Module) -> Option<(usize, usize)> {
    let w = m.rule.weight();
    let meta = m.tensors.get(w.suffix)?;
    if meta.shape.len() != 2 {
        return None;
    }
    let out = match w.shape[0] {
        HalfOut => meta.shape[0] * 2,
        _ => meta.shape[0],
    };
    let inp = match w.shape[1] {
        InPerWord => meta.shape[1] * 8,
        _ => meta.shape[1],
    };
    Some((out, inp))
}

fn check_module(m: &Module, d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    let r = m.rule;
    let kind = LayerKind::of(&m.name);
    let target = s.target;
    if !r.loads(target, kind) {
        let others: Vec<&str> = TYPES.iter().filter(|x| x.loads(target, kind)).map(|x| x.name).collect();
        out.push(problem(
            "layer kind",
            &m.name,
            format!(
                "is a {} typed {}, which {} loads only for {} ({}); a {} loads as {}",
                kind.describe(),
                r.name,
                target.server(),
                plural_kinds(r.kinds(target)),
                r.source,
                kind.describe(),
                others.join(", ")
            ),
        ));
    }
    let w = r.weight();
    let Some((o, i)) = out_in(m) else {
        out.push(problem(
            "tensors",
            &m.name,
            format!("has no 2-D {}.{} (every {} linear has one)", m.name, w.suffix, r.name),
        ));
        return;
    };
    let groups = m.tensors.get("weight_scale").map(|t| t.shape.get(1).copied().unwrap_or(1)).unwrap_or(1);
    for tr in r.tensors {
        let name = format!("{}.{}", m.name, tr.suffix);
        let Some(meta) = m.tensors.get(tr.suffix) else {
            if tr.required {
                out.push(problem("tensors", &name, format!("is missing: every {} linear has it", r.name)));
            }
            continue;
        };
        let want: Vec<usize> = tr.shape.iter().map(|&x| dim(x, &m.name, o, i, groups)).collect();
        if meta.shape != want {
            out.push(problem(
                "shapes",
                &name,
                format!("has shape {:?}; a {} linear of {o} × {i} needs {want:?}", meta.shape, r.name),
            ));
        }
        check_dtype(&name, meta.dtype, tr.dtype, s, out);
    }
    if let Some(b) = m.tensors.get("bias") {
        if b.shape != [o] || !b.dtype.is_float() {
            out.push(problem(
                "shapes",
                format!("{}.bias", m.name),
                format!("is {} {:?}; a bias is float [{o}]", b.dtype.name(), b.shape),
            ));
        }
    }
    // Per-group scales.
    if groups > 1 {
        match r.grouping {
            Grouping::PerChannel if target == Target::VllmAscend => out.push(problem(
                "group size",
                format!("{}.weight_scale", m.name),
                format!(
                    "has {groups} groups per row, but {} reads {} scales per output channel only ([out, 1]; {}); per-group scales load in MindIE (--target mindie)",
                    target.server(),
                    r.name,
                    r.source.split(':').next().unwrap_or("")
                ),
            )),
            _ => {}
        }
    }
    // vLLM-Ascend's W4A16 method builds all-zero offsets and never loads `weight_offset` (methods/w4a16.py):
    // asymmetric weights would be computed without their zero points.
    if r.name == "W4A16" && target == Target::VllmAscend && m.tensors.contains_key("weight_offset") {
        out.push(problem(
            "asymmetric",
            format!("{}.weight_offset", m.name),
            "is written, but vLLM-Ascend's W4A16 method (methods/w4a16.py) builds zero offsets and never loads it, so these asymmetric weights would compute without their zero points; use symmetric int4 weights (symmetric: true) for vLLM-Ascend",
        ));
    }
    if let Some(limit) = shape_limit(r, target, &m.name, o, i, d.group_size()) {
        let loads = loadable_types(target, &m.name, o, i);
        out.push(problem(
            "divisibility",
            &m.name,
            format!(
                "{} ({} of {o} × {i}): {limit}; types that load here: {}",
                r.name,
                kind.describe(),
                if loads.is_empty() { "none (keep it FLOAT)".to_string() } else { loads.join(", ") }
            ),
        ));
    }
}

fn plural_kinds(kinds: &[LayerKind]) -> String {
    let v: Vec<String> = kinds.iter().map(|k| format!("{}s (layer_type \"{}\")", k.describe(), k.vllm())).collect();
    if v.is_empty() {
        "no layer".into()
    } else {
        v.join(" and ")
    }
}

fn check_dtype(name: &str, got: DType, want: DTypeRule, s: &Setting, out: &mut Vec<Problem>) {
    match want {
        Is(d) if got != d => {
            out.push(problem("dtypes", name, format!("is {}; the loader reads {}", got.name(), d.name())))
        }
        Float if !matches!(got, DType::F32 | DType::F16 | DType::BF16) => out.push(problem(
            "dtypes",
            name,
            format!("is {}; the loader reads a float scale (lamina and msModelSlim write F32)", got.name()),
        )),
        DeqScale => match s.serving {
            Some(serving) => match deq_scale_dtype(serving) {
                Some(d) if d != got => out.push(problem(
                    "deq_scale dtype",
                    name,
                    format!(
                        "is {}, but served in {} the loader creates deq_scale as {} (w8a8_static.py get_perchannel_param: F32 for bfloat16, the F32 bits in I64 for float16) and would read garbage; requantize with --serving_dtype {}",
                        got.name(),
                        serving.torch_name(),
                        d.name(),
                        serving.torch_name()
                    ),
                )),
                None => out.push(problem(
                    "deq_scale dtype",
                    name,
                    format!(
                        "static W8A8 cannot be served in {}: the loader creates deq_scale only for bfloat16 and float16 (w8a8_static.py); pass --serving_dtype bfloat16 or float16",
                        serving.torch_name()
                    ),
                )),
                Some(_) => {}
            },
            None if !matches!(got, DType::F32 | DType::I64) => out.push(problem(
                "deq_scale dtype",
                name,
                format!("is {}; the loader reads F32 (bfloat16 serving) or I64 (float16 serving)", got.name()),
            )),
            None => {}
        },
        _ => {}
    }
}

/// The description's one `group_size` against the per-group linears, and W4A8's refusal of any.
fn check_groups(mods: &BTreeMap<String, Module>, d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    let global = d.group_size();
    let mut sizes: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for m in mods.values() {
        let Some((_, i)) = out_in(m) else { continue };
        let groups = m.tensors.get("weight_scale").and_then(|t| t.shape.get(1).copied()).unwrap_or(1);
        // The group length is what the loader derives, in / groups; a ragged split (an input the group
        // size does not divide) is the divisibility rule's finding, not this one's.
        let grouped = groups > 1 || m.rule.grouping == Grouping::PerGroup;
        let ragged =
            groups == 0 || i % groups != 0 || (global > 0 && m.rule.grouping == Grouping::PerGroup && i % global != 0);
        if grouped && !ragged {
            sizes.entry(i / groups).or_default().push(&m.name);
        }
    }
    if sizes.len() > 1 {
        let list: Vec<String> = sizes.iter().map(|(g, ms)| format!("{g} ({}, …)", ms[0])).collect();
        out.push(problem(
            "group size",
            "group_size",
            format!(
                "per-group linears use {} group lengths ({}), but the description holds one group_size, which every loader applies to all of them",
                sizes.len(),
                list.join("; ")
            ),
        ));
    }
    if let Some((&g, ms)) = sizes.iter().next() {
        if sizes.len() == 1 && g != global {
            out.push(problem(
                "group size",
                "group_size",
                format!("is {global}, but the per-group linears ({}, …) use groups of {g}", ms[0]),
            ));
        }
    }
    if s.target == Target::VllmAscend && global > 0 {
        if let Some(m) = mods.values().find(|m| m.rule.name == "W4A8_DYNAMIC") {
            let per_group: Vec<&str> = sizes.values().flatten().copied().take(1).collect();
            out.push(problem(
                "group size",
                &m.name,
                format!(
                    "is W4A8_DYNAMIC while the description's group_size is {global}{}: AscendW4A8DynamicFusedMoEMethod refuses any group_size > 0 (methods/w4a8.py: \"Per-Group quantization, which is no longer supported\"); keep every other linear per channel",
                    if per_group.is_empty() { String::new() } else { format!(" (set by {})", per_group[0]) }
                ),
            ));
        }
    }
}

/// Every member of a fused module, and every expert of a MoE layer, share one type.
fn check_fused(d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    let fam = family(&s.model_type);
    // Linear weights: `X.weight` (or W4A16's `X.weight_packed`) with a 2-D shape.
    let mut linear_types: BTreeMap<String, &str> = BTreeMap::new();
    for (name, kind) in &d.types {
        let module = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".weight_packed"));
        if let Some(m) = module {
            if d.tensors.get(name).is_some_and(|t| t.shape.len() == 2) {
                linear_types.insert(m.to_string(), kind.as_str());
            }
        }
    }
    // Fused groups: parent + fused name → (member, type).
    let mut groups: BTreeMap<(String, &str), Vec<(&str, &str)>> = BTreeMap::new();
    let mut experts: BTreeMap<String, Vec<(String, &str)>> = BTreeMap::new();
    for (m, kind) in &linear_types {
        let (parent, leaf) = m.rsplit_once('.').unwrap_or(("", m.as_str()));
        if LayerKind::of(m) == Expert {
            let layer = m.split(".experts.").next().unwrap_or(m).to_string();
            experts.entry(layer).or_default().push((m.clone(), kind));
            continue;
        }
        for (fused, members) in fam.packed {
            if members.contains(&leaf) {
                groups.entry((parent.to_string(), fused)).or_default().push((leaf, kind));
            }
        }
    }
    for ((parent, fused), members) in &groups {
        let all = fam.packed.iter().find(|(f, _)| f == fused).map(|(_, m)| *m).unwrap_or(&[]);
        let present: BTreeSet<&str> = members.iter().map(|(l, _)| *l).collect();
        let missing: Vec<&&str> = all.iter().filter(|l| !present.contains(**l)).collect();
        let subject = format!("{parent}.{fused}");
        // vLLM builds fused_qkv_a_proj only when the model has q_lora_rank (models/deepseek_v2.py,
        // DeepseekV2MLAAttention); without q_a_proj (DeepSeek-V2-Lite) kv_a_proj_with_mqa is a layer
        // of its own.
        if *fused == "fused_qkv_a_proj" && !present.contains("q_a_proj") {
            continue;
        }
        // HunYuan's cross-layer attention layers have q_proj alone, a layer of its own: vLLM's
        // hunyuan_v1.py skips the qkv packing for them ("cross layer only have q_proj") and MindIE's
        // atb_llm hunyuan loads a `cross` layer's q_proj by itself.
        let hunyuan = matches!(s.model_type.as_str(), "hunyuan" | "hunyuan_v1_moe");
        if *fused == "qkv_proj" && hunyuan && present.len() == 1 && present.contains("q_proj") {
            continue;
        }
        if !missing.is_empty() {
            out.push(problem(
                "fused",
                &subject,
                format!(
                    "vLLM fuses {} into one layer, but {} {} no description entry: the type lookup (modelslim_config.py get_linear_quant_type) fails",
                    all.join(" + "),
                    missing.iter().map(|l| format!("{parent}.{l}.weight")).collect::<Vec<_>>().join(", "),
                    if missing.len() == 1 { "has" } else { "have" }
                ),
            ));
        }
        let types: BTreeSet<&str> = members.iter().map(|(_, k)| *k).collect();
        if types.len() > 1 {
            let list: Vec<String> = members.iter().map(|(l, k)| format!("{l} {k}")).collect();
            out.push(problem(
                "fused",
                &subject,
                format!(
                    "vLLM fuses {} into one layer with one scheme, but they are typed {} (modelslim_config.py: \"Not all shards … are quantized with same quant type\"); give them one type",
                    all.join(" + "),
                    list.join(", ")
                ),
            ));
        }
    }
    for (layer, members) in &experts {
        let subject = format!("{layer}.experts");
        let types: BTreeSet<&str> = members.iter().map(|(_, k)| *k).collect();
        if types.len() > 1 {
            let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for (m, k) in members {
                by_type.entry(k).or_default().push(m.rsplit_once(".experts.").map_or(m, |p| p.1));
            }
            let list: Vec<String> =
                by_type.iter().map(|(k, ms)| format!("{k}: {} linear(s), e.g. {}", ms.len(), ms[0])).collect();
            out.push(problem(
                "fused",
                &subject,
                format!(
                    "vLLM loads every expert of a MoE layer into one fused layer typed from expert 0 (modelslim_config.py, packed mapping \"experts\"), but its experts mix types ({}); give them one type",
                    list.join("; ")
                ),
            ));
        }
        let quantized = types.iter().any(|k| *k != FLOAT);
        if quantized && s.target == Target::VllmAscend && !fam.experts {
            out.push(problem(
                "fused",
                &subject,
                format!(
                    "model_type {:?} has no \"experts\" entry in vLLM-Ascend's packed_modules_model_mapping (modelslim_config.py), so the fused MoE layer's type lookup ({layer}.experts.weight) fails; its experts can only stay FLOAT",
                    s.model_type
                ),
            ));
        }
    }
}

/// The C8 KV cache: the global switch, and four tensors per attention layer named as the loader reads them.
/// The loader reads neither their description type (msModelSlim v1 writes "C8", v0 wrote the linear's type)
/// nor their dtype (it casts to the serving dtype; msModelSlim v1 stores the offsets as int32): any float
/// scale and any float or integer offset loads.
fn check_c8(d: &Described, s: &Setting, out: &mut Vec<Problem>) {
    const SUFFIXES: [&str; 4] = [C8_TENSORS[0].0, C8_TENSORS[1].0, C8_TENSORS[2].0, C8_TENSORS[3].0];
    let c8_tensors: Vec<&String> = d.types.keys().filter(|n| n.contains(".kv_cache_")).collect();
    let switched = d.c8();
    if !switched {
        if let Some(n) = c8_tensors.first() {
            out.push(problem(
                "C8",
                *n,
                "is a KV-cache scale, but the description's kv_cache_type is not \"C8\": vLLM-Ascend enables C8 only on kv_cache_type == \"C8\" (modelslim_config.py) and would find no parameter for it",
            ));
        }
        return;
    }
    if d.globals.get("kv_quant_type").and_then(|v| v.as_str()).is_some_and(|v| v != "C8") {
        out.push(problem("C8", "kv_quant_type", "differs from kv_cache_type \"C8\" (msModelSlim writes both as C8)"));
    }
    // Attention layers: those with a k_proj linear.
    let attn: BTreeSet<String> = d
        .types
        .keys()
        .filter_map(|n| n.strip_suffix(".k_proj.weight"))
        .filter(|p| LayerKind::of(p) == Linear && !is_vision(p))
        .map(str::to_string)
        .collect();
    if attn.is_empty() {
        out.push(problem(
            "C8",
            "kv_cache_type",
            "is \"C8\" but the model has no k_proj linear to attach the KV-cache scales to (MLA models use FAKQuant, fa_quant_type, instead)",
        ));
    }
    if let Some(why) = s.head_dim.and_then(|h| c8_head_limit(s.target, h)) {
        out.push(problem("C8", "kv_cache_type", why));
    }
    for a in &attn {
        for sfx in SUFFIXES {
            let name = format!("{a}.{sfx}");
            let Some(meta) = d.tensors.get(&name) else {
                out.push(problem(
                    "C8",
                    &name,
                    "is missing: kv_cache_type is C8 and every attention layer needs its K and V cache scale and offset",
                ));
                continue;
            };
            let float = matches!(meta.dtype, DType::F32 | DType::F16 | DType::BF16);
            let int = matches!(meta.dtype, DType::I8 | DType::I32 | DType::I64);
            if !(float || (int && sfx.ends_with("offset"))) {
                let (what, want) =
                    if sfx.ends_with("offset") { ("offset", "float or integer") } else { ("scale", "float") };
                out.push(problem("C8", &name, format!("is {}; a C8 {what} is {want}", meta.dtype.name())));
            }
            let numel: usize = meta.shape.iter().product();
            if let Some(ch) = s.kv_channels {
                if numel != ch && numel != 1 {
                    out.push(problem(
                        "C8",
                        &name,
                        format!(
                            "has {numel} values; the C8 backend (attention_v1.py _prepare_c8_scales) reads one per KV channel, num_key_value_heads × head_dim = {ch} (or a single one)"
                        ),
                    ));
                }
            }
        }
    }
    for n in c8_tensors {
        let layer = SUFFIXES.iter().find_map(|s| n.strip_suffix(&format!(".{s}")));
        if !layer.is_some_and(|l| attn.contains(l)) {
            out.push(problem(
                "C8",
                n,
                "is not one of the four C8 tensors of an attention layer (ATTN.k_proj.kv_cache_scale/offset, ATTN.v_proj.kv_cache_scale/offset)",
            ));
        }
    }
}

fn is_vision(module: &str) -> bool {
    ["visual.", "vision_tower.", "vision_model."].iter().any(|v| module.contains(v))
}

fn check_globals(mods: &BTreeMap<String, Module>, d: &Described, out: &mut Vec<Problem>) {
    let strongest = mods
        .values()
        .filter_map(|m| PRIORITY.iter().position(|p| *p == m.rule.name))
        .max()
        .map_or("FLOAT", |i| PRIORITY[i]);
    match d.globals.get("model_quant_type").and_then(|v| v.as_str()) {
        None => out.push(problem(
            "globals",
            "model_quant_type",
            format!("is missing (msModelSlim writes the strongest type present, here {strongest}; MindIE reads it)"),
        )),
        Some(m) if m != strongest => out.push(problem(
            "globals",
            "model_quant_type",
            format!("is {m}, but the strongest type present is {strongest} (msModelSlim's QUANT_TYPE_PRIORITY; MindIE picks its backend by it)"),
        )),
        _ => {}
    }
    if !d.globals.get("group_size").is_some_and(|v| v.is_u64()) {
        out.push(problem(
            "globals",
            "group_size",
            "is missing or not a non-negative integer (the loaders read it; 0 when every linear is per channel)",
        ));
    }
}

/// Reads small tensors for [`check_values`].
pub trait Values {
    fn f32s(&self, name: &str) -> Result<Vec<f32>>;
}

/// The numeric rules: finite positive scales, integral int8 activation offsets, static W8A8 members of a
/// fused module sharing one activation quantizer (vLLM keeps one `input_scale` per fused layer:
/// `w8a8_static.py` `get_pertensor_param` is `[1]`), and for vLLM-Ascend zero C8 offsets (its decode path
/// dequantizes the int8 cache with the scale alone, `attention_v1.py` `_dequant_paged_kv_to_dense`: "Scale-only
/// dequant").
pub fn check_values(d: &Described, s: &Setting, v: &dyn Values) -> Vec<Problem> {
    let mut out = Vec::new();
    let read = |name: &str, out: &mut Vec<Problem>| -> Option<Vec<f32>> {
        match v.f32s(name) {
            Ok(x) => Some(x),
            Err(e) => {
                out.push(problem("values", name, format!("cannot be read: {e:#}")));
                None
            }
        }
    };
    // (parent, fused name) → (member, input_scale, input_offset).
    type Statics<'a> = BTreeMap<(String, &'a str), Vec<(String, f32, f32)>>;
    let mut statics: Statics = BTreeMap::new();
    let fam = family(&s.model_type);
    for (name, kind) in &d.types {
        let Some(module) = name.strip_suffix(".input_scale") else { continue };
        if !matches!(kind.as_str(), "W8A8" | "W8A8_MIX" | "W8A8S") || !d.tensors.contains_key(name) {
            continue;
        }
        let (Some(sc), Some(off)) = (read(name, &mut out), read(&format!("{module}.input_offset"), &mut out)) else {
            continue;
        };
        let (sc, off) = (sc.first().copied().unwrap_or(f32::NAN), off.first().copied().unwrap_or(f32::NAN));
        if !(sc.is_finite() && sc > 0.0) {
            out.push(problem("values", name, format!("is {sc}; an activation scale is finite and positive")));
        }
        if !(off.is_finite() && off.fract() == 0.0 && (-128.0..=127.0).contains(&off)) {
            out.push(problem(
                "values",
                format!("{module}.input_offset"),
                format!("is {off}; the loader stores it in an int8 parameter (w8a8_static.py), so it must be an integer in [-128, 127]"),
            ));
        }
        let (parent, leaf) = module.rsplit_once('.').unwrap_or(("", module));
        for (fused, members) in fam.packed {
            if members.contains(&leaf) {
                statics.entry((parent.to_string(), fused)).or_default().push((leaf.to_string(), sc, off));
            }
        }
    }
    for ((parent, fused), members) in statics {
        if members.windows(2).any(|w| w[0].1 != w[1].1 || w[0].2 != w[1].2) {
            let list: Vec<String> = members.iter().map(|(l, sc, off)| format!("{l} ({sc:e}, {off})")).collect();
            out.push(problem(
                "fused",
                format!("{parent}.{fused}"),
                format!(
                    "static W8A8 members have different input scales/offsets ({}); vLLM keeps one per fused layer (w8a8_static.py input_scale is [1]), so all but one would compute with the wrong quantizer",
                    list.join(", ")
                ),
            ));
        }
    }
    for name in d.types.keys() {
        if !is_c8_tensor(name) || !d.tensors.contains_key(name) {
            continue;
        }
        let Some(x) = read(name, &mut out) else { continue };
        if name.ends_with("kv_cache_scale") {
            if let Some(bad) = x.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                out.push(problem("values", name, format!("holds {bad}; a C8 scale is finite and positive")));
            }
        } else if s.target == Target::VllmAscend {
            if let Some(bad) = x.iter().find(|v| **v != 0.0) {
                out.push(problem(
                    "C8",
                    name,
                    format!(
                        "holds {bad}: vLLM-Ascend's C8 decode dequantizes the int8 cache with the scale alone (attention_v1.py, \"Scale-only dequant\"), so offsets must be 0 (symmetric); asymmetric C8 loads in MindIE (--target mindie)"
                    ),
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The problems as lines for a person: identical findings on many tensors are listed once, with the first
/// few subjects and a count.
pub fn report(problems: &[Problem]) -> String {
    let mut grouped: BTreeMap<(&str, String), Vec<&str>> = BTreeMap::new();
    for p in problems {
        // Numbers in the detail that repeat the subject's shape stay: identical details group.
        grouped.entry((p.rule, p.detail.clone())).or_default().push(&p.subject);
    }
    let mut lines = Vec::new();
    for ((rule, detail), subjects) in grouped {
        let shown: Vec<&str> = subjects.iter().take(3).copied().collect();
        let more = if subjects.len() > 3 { format!(" and {} more", subjects.len() - 3) } else { String::new() };
        lines.push(format!("- [{rule}] {}{more}: {detail}", shown.join(", ")));
    }
    lines.join("\n")
}
