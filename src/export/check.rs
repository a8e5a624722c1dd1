//! `lamina check OUT`: an output folder, lamina's or msModelSlim's, against a server's loader rules
//! ([`super::rules`]). Reads only the description, config.json and the safetensors headers (plus the few
//! small tensors the numeric rules look at), so it runs in seconds on any model size.

use super::ascend::DESCRIPTION;
use super::rules::{self, Described, Problem, Setting, Target};
use crate::io::safetensors::SafetensorsFile;
use crate::tensor::{decode_f32, DType, TensorMeta};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `lamina check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub dir: PathBuf,
    pub target: Target,
    pub serving: Option<DType>,
    pub tensors: usize,
    /// Quantized (and FLOAT) linear weights by description type.
    pub linears: BTreeMap<String, usize>,
    pub c8: bool,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// The lines `lamina check` prints.
    pub fn summary(&self) -> String {
        let serving = self.serving.map_or("unknown".to_string(), |d| d.torch_name().to_string());
        let kinds: Vec<String> = self.linears.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let mut s = format!(
            "{}: {} tensors; linear weights: {}{}; target {} (serving dtype {serving})\n",
            self.dir.display(),
            self.tensors,
            if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") },
            if self.c8 { "; C8 KV cache" } else { "" },
            self.target.server(),
        );
        if self.problems.is_empty() {
            s.push_str(&format!("ok: {} loads this output as far as its rules go\n", self.target.server()));
        } else {
            s.push_str(&format!(
                "{} problem(s): {} would not load it as it is:\n{}\n",
                self.problems.len(),
                self.target.server(),
                rules::report(&self.problems)
            ));
        }
        s
    }
}

/// Checks the folder `dir` for `target`; `serving` overrides the serving dtype (else the one lamina
/// recorded in the description's metadata, else config.json's `torch_dtype`). Errors only when the folder
/// cannot be read at all; everything a loader would refuse is a [`Problem`].
pub fn check_folder(dir: &Path, target: Target, serving: Option<DType>) -> Result<CheckReport> {
    if !dir.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    let mut problems = Vec::new();
    incomplete_run(dir, &mut problems);
    let desc_path = dir.join(DESCRIPTION);
    if !desc_path.exists() {
        if problems.is_empty() {
            bail!("{} has no {DESCRIPTION}: not an Ascend-format (msModelSlim / lamina) output", dir.display());
        }
        // A run that is writing the folder, or stopped before the description that completes it.
        return Ok(CheckReport {
            dir: dir.to_path_buf(),
            target,
            serving,
            tensors: 0,
            linears: BTreeMap::new(),
            c8: false,
            problems,
        });
    }
    let p = |rule: &'static str, subject: &str, detail: String| Problem { rule, subject: subject.to_string(), detail };

    let desc: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(
        &std::fs::read(&desc_path).with_context(|| format!("cannot read {}", desc_path.display()))?,
    ) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => bail!("{} is not a JSON object", desc_path.display()),
        Err(e) => bail!("{} is not valid JSON: {e}", desc_path.display()),
    };
    let config: Option<serde_json::Value> =
        std::fs::read(dir.join("config.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if config.is_none() {
        problems.push(p(
            "files",
            "config.json",
            "is missing or not JSON: the server needs the model's config.json beside the weights".into(),
        ));
    }
    if let Some(q) = config.as_ref().and_then(|c| c.get("quantization_config")) {
        problems.push(p(
            "files",
            "config.json",
            format!(
                "still has a quantization_config ({}): vLLM would load the folder with that method, not the Ascend one (msModelSlim removes it)",
                q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("?")
            ),
        ));
    }

    // The weight files: those the index names, else every *.safetensors (vLLM loads every one).
    let files = weight_files(dir, &mut problems)?;
    let mut opened = Vec::new();
    let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
    let mut where_: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for f in &files {
        match SafetensorsFile::open(f) {
            Ok(st) => {
                let k = opened.len();
                for (i, t) in st.tensors.iter().enumerate() {
                    if tensors.insert(t.name.clone(), t.meta()).is_some() {
                        problems.push(p(
                            "files",
                            &t.name,
                            format!("is in more than one weights file ({})", f.display()),
                        ));
                    }
                    where_.insert(t.name.clone(), (k, i));
                }
                opened.push(st);
            }
            Err(e) => problems.push(p("files", &f.display().to_string(), format!("{e:#}"))),
        }
    }
    index_agrees(dir, &opened, &mut problems);

    let described = Described::from_description(&desc, tensors);
    let recorded = described
        .globals
        .get("metadata")
        .and_then(|m| m.get("serving_dtype"))
        .and_then(|v| v.as_str())
        .and_then(DType::from_torch_name);
    let serving = serving.or(recorded).or_else(|| config.as_ref().and_then(crate::model::config::torch_dtype));
    let text = config.as_ref().and_then(|c| crate::model::config::TextConfig::from_json(c).ok());
    let setting = Setting {
        target,
        model_type: config
            .as_ref()
            .and_then(|c| c.get("model_type"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        serving,
        kv_channels: text.map(|t| t.num_kv_heads * t.head_dim),
    };
    problems.extend(rules::check(&described, &setting));
    let values = FolderValues { files: &opened, where_: &where_ };
    problems.extend(rules::check_values(&described, &setting, &values));
    problems.sort();
    problems.dedup();

    let mut linears = BTreeMap::new();
    for (name, kind) in &described.types {
        let linear = name.ends_with(".weight_packed")
            || (name.ends_with(".weight") && described.tensors.get(name).is_some_and(|t| t.shape.len() == 2));
        if linear {
            *linears.entry(kind.clone()).or_default() += 1;
        }
    }
    Ok(CheckReport {
        dir: dir.to_path_buf(),
        target,
        serving,
        tensors: described.tensors.len(),
        linears,
        c8: described.c8(),
        problems,
    })
}

/// A lamina run still writing the folder, or one that stopped before finishing it.
fn incomplete_run(dir: &Path, problems: &mut Vec<Problem>) {
    let p = |subject: &str, detail: &str| Problem { rule: "files", subject: subject.into(), detail: detail.into() };
    if crate::io::lock::is_locked(dir) {
        problems.push(p(
            crate::io::lock::LOCK_FILE,
            "a lamina run is writing this folder now; check it when the run has finished",
        ));
    }
    if let Ok(Some(h)) = crate::io::journal::Journal::read(dir) {
        if !h.complete {
            problems.push(p(
                crate::io::journal::JOURNAL,
                "records an unfinished lamina run: rerun the same command to finish the output",
            ));
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with('.') && n.ends_with(".partial") {
                problems.push(p(&n, "is a half-written file: the output is not complete"));
            }
        }
    }
}

const INDEX: &str = "quant_model_weights.safetensors.index.json";

/// The weight files a server reads: with an index, the files it names (vLLM keeps only those); without,
/// every `*.safetensors` of the folder.
fn weight_files(dir: &Path, problems: &mut Vec<Problem>) -> Result<Vec<PathBuf>> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.ends_with(".safetensors") && !n.starts_with('.')
        })
        .collect();
    all.sort();
    let index = dir.join(INDEX);
    if !index.exists() {
        if all.is_empty() {
            problems.push(Problem {
                rule: "files",
                subject: dir.display().to_string(),
                detail: "holds no *.safetensors weights file".into(),
            });
        }
        return Ok(all);
    }
    let map = match read_index(&index) {
        Ok(m) => m,
        Err(e) => {
            problems.push(Problem { rule: "files", subject: INDEX.into(), detail: format!("{e:#}") });
            return Ok(all);
        }
    };
    let named: std::collections::BTreeSet<&String> = map.values().collect();
    let mut files = Vec::new();
    for f in named {
        let path = dir.join(f);
        if !path.exists() {
            problems.push(Problem {
                rule: "files",
                subject: f.clone(),
                detail: format!("is named by {INDEX} but does not exist"),
            });
        } else {
            files.push(path);
        }
    }
    for f in &all {
        if !files.contains(f) {
            problems.push(Problem {
                rule: "files",
                subject: f.file_name().unwrap().to_string_lossy().into(),
                detail: format!("is a weights file {INDEX} does not name: the server ignores it"),
            });
        }
    }
    Ok(files)
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?).context("not valid JSON")?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).context("has no weight_map object")?;
    map.iter()
        .map(|(k, v)| {
            Ok((k.clone(), v.as_str().with_context(|| format!("weight_map[{k}] is not a file name"))?.to_string()))
        })
        .collect()
}

/// Every tensor of the index is in the file it names, and every tensor of the files is in the index.
fn index_agrees(dir: &Path, files: &[SafetensorsFile], problems: &mut Vec<Problem>) {
    let index = dir.join(INDEX);
    let Ok(map) = read_index(&index) else { return };
    let mut actual: BTreeMap<&str, String> = BTreeMap::new();
    for f in files {
        let name = f.path.file_name().unwrap().to_string_lossy().to_string();
        for t in &f.tensors {
            actual.insert(&t.name, name.clone());
        }
    }
    for (t, f) in &map {
        match actual.get(t.as_str()) {
            Some(g) if g == f => {}
            Some(g) => problems.push(Problem {
                rule: "files",
                subject: t.clone(),
                detail: format!("is in {g}, but {INDEX} says {f}"),
            }),
            None => problems.push(Problem {
                rule: "files",
                subject: t.clone(),
                detail: format!("is listed in {INDEX} ({f}) but no weights file holds it"),
            }),
        }
    }
    for (t, g) in &actual {
        if !map.contains_key(*t) {
            problems.push(Problem {
                rule: "files",
                subject: t.to_string(),
                detail: format!("is in {g} but not in {INDEX}"),
            });
        }
    }
}

struct FolderValues<'a> {
    files: &'a [SafetensorsFile],
    where_: &'a BTreeMap<String, (usize, usize)>,
}

impl rules::Values for FolderValues<'_> {
    fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let &(k, i) = self.where_.get(name).context("not in any weights file")?;
        let f = &self.files[k];
        let e = &f.tensors[i];
        decode_f32(e.dtype, f.bytes(e))
    }
}
