//! Prompts: the model's chat template rendered with minijinja (the Jinja dialect Hugging Face
//! templates are written in; minijinja-contrib's pycompat supplies Python string methods such
//! as `startswith` and `split`), and the model's `tokenizer.json` through the `tokenizers` crate
//! (or Qwen's `qwen.tiktoken`, see [`super::tiktoken`]).
//!
//! Rendering follows transformers' `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and `raise_exception` in scope,
//! and the `{% generation %}` tag (used only for assistant masks) rendered as its body.

use super::tiktoken::{ImageTags, Tiktoken, QWEN_VL_IMAGE_SPAN};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` from `tokenizer_config.json`.
    pub special_tokens: BTreeMap<String, String>,
    /// The file the template came from (for error messages).
    pub origin: PathBuf,
}

/// The special tokens of `tokenizer_config.json`, which spells them as strings or as
/// `{"content": ...}` objects.
fn special_tokens(model_dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = model_dir.join("tokenizer_config.json");
    let mut out = BTreeMap::new();
    if !path.is_file() {
        return Ok(out);
    }
    let cfg = super::processor::read_json(&path)?;
    for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        let v = cfg.get(key);
        let s = v.and_then(Value::as_str).or_else(|| v.and_then(|v| v.get("content")).and_then(Value::as_str));
        if let Some(s) = s {
            out.insert(key.to_string(), s.to_string());
        }
    }
    Ok(out)
}

/// A `chat_template` value: a string, or a list of `{name, template}` where `default` is used.
fn template_from_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// The model's chat template, looked up where transformers saves it: `chat_template.jinja`,
    /// `chat_template.json` (processors), then `tokenizer_config.json`'s `chat_template`.
    /// `Ok(None)` when the model has none (base models).
    pub fn load(model_dir: &Path) -> Result<Option<ChatTemplate>> {
        let special_tokens = special_tokens(model_dir)?;
        let jinja = model_dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
            return Ok(Some(ChatTemplate { source, special_tokens, origin: jinja }));
        }
        for name in ["chat_template.json", "tokenizer_config.json"] {
            let path = model_dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = super::processor::read_json(&path)?;
            if let Some(source) = json.get("chat_template").and_then(template_from_value) {
                return Ok(Some(ChatTemplate { source, special_tokens, origin: path }));
            }
        }
        Ok(None)
    }

    /// Renders a conversation (`messages` as in transformers: a list of `{role, content}`).
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        let source = strip_generation_tags(&self.source);
        env.render_str(&source, minijinja::Value::from_serialize(&ctx))
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(|| format!("chat template of {}", self.origin.display()))
    }
}

/// One user turn holding an image and a text, as msModelSlim builds calibration prompts.
pub fn image_and_text_message(text: &str) -> Value {
    json!([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}])
}

/// Removes `{% generation %}` / `{% endgeneration %}` (any whitespace-control spelling), a
/// transformers extension that renders its body unchanged.
fn strip_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else { break };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// The error for a model folder with neither `tokenizer.json` nor `qwen.tiktoken`.
pub fn missing_tokenizer(model_dir: &Path) -> anyhow::Error {
    anyhow!(
        "{}: missing (and no {} either); text is tokenized with the model's own tokenizer.json, or \
         qwen.tiktoken for Qwen (1) and Qwen-VL (or give pre-tokenized \"input_ids\" in a JSONL file)",
        model_dir.join("tokenizer.json").display(),
        QWEN_TIKTOKEN
    )
}

/// The vocabulary file of Qwen (1) and Qwen-VL, which ship no `tokenizer.json`.
pub const QWEN_TIKTOKEN: &str = "qwen.tiktoken";

enum Backend {
    /// `tokenizer.json` through the `tokenizers` crate.
    Json(Box<tokenizers::Tokenizer>),
    /// `qwen.tiktoken` as `tokenization_qwen.py` reads it.
    Tiktoken(Box<Tiktoken>),
}

/// A model's tokenizer: its `tokenizer.json`, or for Qwen (1) and Qwen-VL its `qwen.tiktoken`.
pub struct TextTokenizer {
    backend: Backend,
    pub path: PathBuf,
    /// The BOS token string, when `tokenizer_config.json` names one.
    pub bos_token: Option<String>,
}

impl TextTokenizer {
    /// Whether `model_dir` has a tokenizer lamina reads.
    pub fn exists(model_dir: &Path) -> bool {
        model_dir.join("tokenizer.json").is_file() || model_dir.join(QWEN_TIKTOKEN).is_file()
    }

    /// Loads `tokenizer.json` from a model folder, else `qwen.tiktoken` (Qwen-VL's image tags when
    /// config.json has a `visual` section); neither is an error that names them.
    pub fn load(model_dir: &Path) -> Result<TextTokenizer> {
        let path = model_dir.join("tokenizer.json");
        let bos_token = special_tokens(model_dir)?.remove("bos_token");
        if path.is_file() {
            let tokenizer = tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| anyhow!("{}: cannot load the tokenizer: {e}", path.display()))?;
            return Ok(TextTokenizer { backend: Backend::Json(Box::new(tokenizer)), path, bos_token });
        }
        let path = model_dir.join(QWEN_TIKTOKEN);
        if !path.is_file() {
            return Err(missing_tokenizer(model_dir));
        }
        let config_path = model_dir.join("config.json");
        let config = super::processor::read_json(&config_path)?;
        let visual = config.get("visual").filter(|v| v.is_object());
        let span = match visual.map(|v| v.get("n_queries").filter(|n| !n.is_null())) {
            None => None,
            Some(None) => Some(QWEN_VL_IMAGE_SPAN),
            Some(Some(n)) => Some(n.as_u64().filter(|&n| n > 0).with_context(|| {
                format!("{}: visual.n_queries is {n}, not a positive integer", config_path.display())
            })? as usize),
        };
        let tiktoken = Tiktoken::qwen(&path, span)?;
        if let (Some(v), Some(tags)) = (visual, tiktoken.image_tags) {
            let start = v.get("image_start_id").and_then(Value::as_i64);
            if start != Some(i64::from(tags.start)) {
                bail!(
                    "{}: <img> is token {} (after its {} ranks and the special tokens), but {} has \
                     visual.image_start_id {}; the vocabulary and the model do not match",
                    path.display(),
                    tags.start,
                    tags.start - 214,
                    config_path.display(),
                    start.map_or("missing".to_string(), |s| s.to_string())
                );
            }
        }
        Ok(TextTokenizer { backend: Backend::Tiktoken(Box::new(tiktoken)), path, bos_token })
    }

    /// Qwen-VL's image tags when this is its `qwen.tiktoken`: `<img>PATH</img>` in a text becomes
    /// `<img>`, PATH's bytes, `<imgpad>` up to the model's `visual.n_queries` positions
    /// ([`QWEN_VL_IMAGE_SPAN`] in the releases and tokenization_qwen.py) and `</img>`.
    pub fn qwen_vl_image_tags(&self) -> Option<ImageTags> {
        match &self.backend {
            Backend::Tiktoken(t) => t.image_tags,
            Backend::Json(_) => None,
        }
    }

    /// Token ids of a text. `add_special_tokens` applies the tokenizer's post-processor (BOS for
    /// Llama, nothing for Qwen; `qwen.tiktoken` has none).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let ids = match &self.backend {
            Backend::Json(t) => t
                .encode(text, add_special_tokens)
                .map_err(|e| anyhow!("{}: cannot tokenize: {e}", self.path.display()))?
                .get_ids()
                .to_vec(),
            Backend::Tiktoken(t) => {
                t.encode(text).with_context(|| format!("tokenizing with {}", self.path.display()))?
            }
        };
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// Tokenizes a rendered chat prompt the way a transformers processor does: special tokens
    /// are added unless the prompt already starts with the BOS token.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<i64>> {
        let has_bos = self.bos_token.as_deref().is_some_and(|b| !b.is_empty() && prompt.starts_with(b));
        self.encode(prompt, !has_bos)
    }

    /// The ids the post-processor puts before any text (for example `[BOS]`).
    pub fn special_prefix(&self) -> Result<Vec<i64>> {
        let with = self.encode("", true)?;
        let without = self.encode("", false)?;
        Ok(with[..with.len().saturating_sub(without.len())].to_vec())
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        match &self.backend {
            Backend::Json(t) => t.token_to_id(token),
            Backend::Tiktoken(t) => t.token_to_id(token),
        }
        .map(i64::from)
    }

    pub fn id_to_token(&self, id: i64) -> Option<String> {
        let id = u32::try_from(id).ok()?;
        match &self.backend {
            Backend::Json(t) => t.id_to_token(id),
            Backend::Tiktoken(t) => t.id_to_token(id),
        }
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| u32::try_from(i).unwrap_or(u32::MAX)).collect();
        match &self.backend {
            Backend::Json(t) => {
                t.decode(&ids, false).map_err(|e| anyhow!("{}: cannot decode: {e}", self.path.display()))
            }
            Backend::Tiktoken(t) => t.decode(&ids),
        }
    }
}

/// Replaces the single image token (or run of image tokens) of a prompt by `count` copies, as
/// the processors expand the image placeholder to the number of image embeddings. A run that
/// already has `count` tokens is kept. Exactly one image per prompt.
pub fn expand_image_tokens(ids: &[i64], image_token: i64, count: usize) -> Result<Vec<i64>> {
    let positions: Vec<usize> = ids.iter().enumerate().filter(|(_, &t)| t == image_token).map(|(i, _)| i).collect();
    let Some(&first) = positions.first() else {
        bail!("the prompt has no image token (id {image_token})");
    };
    let run = positions.len();
    if positions.last().unwrap() - first + 1 != run {
        bail!(
            "the prompt has more than one image (image token {image_token} in separate places); one image per prompt"
        );
    }
    if run != 1 && run != count {
        bail!("the prompt has {run} image tokens; the image needs {count} (or one placeholder to expand)");
    }
    let mut out = Vec::with_capacity(ids.len() + count - run);
    out.extend_from_slice(&ids[..first]);
    out.extend(std::iter::repeat_n(image_token, count));
    out.extend_from_slice(&ids[first + run..]);
    Ok(out)
}

/// The prompt text for one image and a text. The template is tried with the image as a content
/// part (how vision-language templates take it); when it has no template, or a text-only template
/// cannot place the image, the `placeholder` is put before the text in a plain string message.
pub fn image_prompt(
    template: Option<&ChatTemplate>,
    placeholder: &str,
    image_token: &str,
    text: &str,
) -> Result<String> {
    let Some(t) = template else {
        return Ok(format!("{placeholder}{text}"));
    };
    if let Ok(p) = t.render(&image_and_text_message(text), true) {
        if p.contains(image_token) {
            return Ok(p);
        }
    }
    let plain = json!([{"role": "user", "content": format!("{placeholder}{text}")}]);
    t.render(&plain, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        let special = BTreeMap::from([("bos_token".to_string(), "<s>".to_string())]);
        ChatTemplate { source: source.into(), special_tokens: special, origin: "test".into() }
    }

    /// The Qwen2-VL release template (abridged to the user/image path), which uses `is string`,
    /// namespaces and whitespace control.
    const QWEN2_VL: &str = "{% set image_count = namespace(value=0) %}{% for message in messages %}\
{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}\
<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n\
{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}\
{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>\
{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    #[test]
    fn renders_a_vision_template_with_image_part() {
        let p = image_prompt(Some(&template(QWEN2_VL)), "<V>", "<|image_pad|>", "Describe it.").unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\
             <|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn text_only_template_gets_the_placeholder_in_the_text() {
        // A Qwen3-style text template calls string methods on the content.
        let src = "{% for m in messages %}{% if m.content.startswith('<tool') %}T{% endif %}\
<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let p = image_prompt(Some(&template(src)), "<A><I><B>", "<I>", "Hi").unwrap();
        assert_eq!(p, "<|im_start|>user\n<A><I><B>Hi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(image_prompt(None, "<A><I><B>", "<I>", "Hi").unwrap(), "<A><I><B>Hi");
    }

    #[test]
    fn llava_template_with_generation_tag_and_bos() {
        // llava-1.5-hf's chat_template.json.
        let src = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}\
{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}\
{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}\
{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}\
{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";
        let p = image_prompt(Some(&template(src)), "<image>\n", "<image>", "What is this?").unwrap();
        assert_eq!(p, "USER: <image>\nWhat is this? ASSISTANT:");
        let t =
            template("{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}x");
        assert_eq!(t.render(&json!([{"role": "user"}]), false).unwrap(), "<s>x");
        let err = format!("{:#}", t.render(&json!([{}, {}]), false).unwrap_err());
        assert!(err.contains("one turn only"), "{err}");
    }

    #[test]
    fn generation_tags_are_stripped_in_every_spelling() {
        assert_eq!(
            strip_generation_tags("a{%- generation -%}b{% endgeneration %}c{% if x %}d{% endif %}"),
            "abc{% if x %}d{% endif %}"
        );
    }

    #[test]
    fn image_tokens_expand_once() {
        assert_eq!(expand_image_tokens(&[1, 9, 2], 9, 3).unwrap(), vec![1, 9, 9, 9, 2]);
        assert_eq!(expand_image_tokens(&[1, 9, 9, 9, 2], 9, 3).unwrap(), vec![1, 9, 9, 9, 2]);
        assert!(expand_image_tokens(&[1, 2], 9, 3).unwrap_err().to_string().contains("no image token"));
        assert!(expand_image_tokens(&[9, 1, 9], 9, 3).unwrap_err().to_string().contains("more than one image"));
        assert!(expand_image_tokens(&[9, 9], 9, 3).unwrap_err().to_string().contains("2 image tokens"));
    }

    #[test]
    fn missing_tokenizer_is_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen2_vl");
        let err = TextTokenizer::load(&dir).err().unwrap().to_string();
        assert!(err.contains("qwen2_vl/tokenizer.json") && err.contains("missing"), "{err}");
    }
}
