//! tiktoken vocabularies: the byte-level BPE of Qwen (1) and Qwen-VL, which ship `qwen.tiktoken`
//! (one `base64(token) rank` per line) and their remote code instead of a `tokenizer.json`.
//!
//! The algorithm is tiktoken's, ported as it is: the text is split around the special tokens
//! (every one of them is allowed in text, as `tokenization_qwen.py` calls tiktoken), each
//! stretch between them is split by the pre-tokenizer regex, and each piece is its own token when
//! the vocabulary has it, else its bytes are merged pairwise, always the adjacent pair whose
//! concatenation has the lowest rank (the leftmost on ties). A `tokenizers` BPE rebuilt from the
//! ranks (as transformers converts tiktoken files) merges only one recorded pair per token, by
//! the pair's position in its merge list, so this follows tiktoken directly instead.
//!
//! [`Tiktoken::qwen`] adds `tokenization_qwen.py`'s rules: NFC first, the special tokens numbered
//! after the ranks, and for Qwen-VL the image tags: `<img>PATH</img>` becomes `<img>`, the bytes of
//! PATH as ids (each byte's value), `<imgpad>` up to 256 positions, `</img>`.

use anyhow::{anyhow, bail, Context, Result};
use fancy_regex::Regex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The pre-tokenizer of `tokenization_qwen.py` (`PAT_STR`).
pub const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen's text special tokens, numbered from the end of the ranks in this order.
fn qwen_specials() -> Vec<String> {
    let mut out: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    out.extend((0..205).map(|i| format!("<|extra_{i}|>")));
    out
}

/// Qwen-VL's `IMAGE_ST`, numbered after [`qwen_specials`] in this order.
const QWEN_VL_TAGS: [&str; 9] =
    ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"];

/// Qwen (1)'s `SPECIAL_START_ID`: the id of `<|endoftext|>`.
pub const QWEN_SPECIAL_START_ID: u32 = 151643;

/// Qwen-VL's `IMG_TOKEN_SPAN`: the positions between `<img>` and `</img>`.
pub const QWEN_VL_IMAGE_SPAN: usize = 256;

/// Qwen-VL's image tags as ids, and the positions of an image between `<img>` and `</img>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTags {
    pub start: u32,
    pub end: u32,
    pub pad: u32,
    pub span: usize,
}

/// A tiktoken encoding: mergeable ranks, special tokens and the pre-tokenizer regex.
pub struct Tiktoken {
    pub path: PathBuf,
    ranks: HashMap<Vec<u8>, u32>,
    /// The bytes of each rank.
    decoder: Vec<Vec<u8>>,
    specials: HashMap<String, u32>,
    special_names: HashMap<u32, String>,
    /// The special tokens as one alternation (none when there are none).
    special_re: Option<Regex>,
    pattern: Regex,
    /// Qwen-VL only.
    pub image_tags: Option<ImageTags>,
}

/// Decodes standard base64 (with or without `=` padding).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let body = s.trim_end_matches('=').as_bytes();
    if body.len() % 4 == 1 || s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * (4 - chunk.len()) as u32;
        out.extend_from_slice(&acc.to_be_bytes()[1..chunk.len()]);
    }
    Some(out)
}

/// Reads a tiktoken file: the bytes of each rank, ranks `0..n` each once.
pub fn read_ranks(path: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut by_rank: Vec<Option<Vec<u8>>> = Vec::new();
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let mut fields = line.split_whitespace();
        let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next()) else {
            bail!("{}: expected `base64-token rank`, found {line:?}", at());
        };
        let bytes = base64_decode(token).with_context(|| format!("{}: {token:?} is not base64", at()))?;
        let rank: usize = rank.parse().with_context(|| format!("{}: rank {rank:?} is not a number", at()))?;
        if rank >= 1 << 24 {
            bail!("{}: rank {rank} is too large for a vocabulary", at());
        }
        if let Some(first) = seen.insert(bytes.clone(), i + 1) {
            bail!("{}: the token {token} is also on line {first}", at());
        }
        if by_rank.len() <= rank {
            by_rank.resize(rank + 1, None);
        }
        if by_rank[rank].replace(bytes).is_some() {
            bail!("{}: rank {rank} is given twice", at());
        }
    }
    if by_rank.is_empty() {
        bail!("{}: no tokens", path.display());
    }
    by_rank
        .into_iter()
        .enumerate()
        .map(|(r, b)| b.ok_or_else(|| anyhow!("{}: no token has rank {r} (the ranks must be 0..n)", path.display())))
        .collect()
}

/// tiktoken's `_byte_pair_merge`: the boundaries of `piece`'s parts after merging, always the
/// adjacent pair whose concatenation has the lowest rank (the leftmost of equal ones).
fn byte_pair_merge(ranks: &HashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<usize> {
    // parts[i] = (start of part i, rank of parts i and i+1 joined).
    let rank_of = |bytes: &[u8]| ranks.get(bytes).copied().unwrap_or(u32::MAX);
    let mut parts: Vec<(usize, u32)> = (0..piece.len() - 1).map(|i| (i, rank_of(&piece[i..i + 2]))).collect();
    parts.push((piece.len() - 1, u32::MAX));
    parts.push((piece.len(), u32::MAX));
    let joined = |parts: &[(usize, u32)], i: usize| {
        if i + 3 < parts.len() {
            rank_of(&piece[parts[i].0..parts[i + 3].0])
        } else {
            u32::MAX
        }
    };
    loop {
        let (mut min, mut at) = (u32::MAX, 0);
        for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
            if r < min {
                (min, at) = (r, i);
            }
        }
        if min == u32::MAX {
            break;
        }
        if at > 0 {
            parts[at - 1].1 = joined(&parts, at - 1);
        }
        parts[at].1 = joined(&parts, at);
        parts.remove(at + 1);
    }
    parts.into_iter().map(|(start, _)| start).collect()
}

impl Tiktoken {
    /// An encoding of `ranks` (the bytes of rank 0, 1, ...) with `specials` (name, id) and the
    /// pre-tokenizer `pattern`.
    pub fn new(path: PathBuf, ranks: Vec<Vec<u8>>, specials: &[(String, u32)], pattern: &str) -> Result<Tiktoken> {
        let pattern = Regex::new(pattern).map_err(|e| anyhow!("{}: the pre-tokenizer regex: {e}", path.display()))?;
        let special_re = if specials.is_empty() {
            None
        } else {
            let alternation: Vec<String> = specials.iter().map(|(s, _)| fancy_regex::escape(s).into_owned()).collect();
            Some(Regex::new(&alternation.join("|")).map_err(|e| anyhow!("the special tokens' regex: {e}"))?)
        };
        let map: HashMap<Vec<u8>, u32> = ranks.iter().enumerate().map(|(r, b)| (b.clone(), r as u32)).collect();
        Ok(Tiktoken {
            path,
            ranks: map,
            decoder: ranks,
            specials: specials.iter().cloned().collect(),
            special_names: specials.iter().map(|(s, i)| (*i, s.clone())).collect(),
            special_re,
            pattern,
            image_tags: None,
        })
    }

    /// `qwen.tiktoken` of a Qwen (1) or Qwen-VL folder with `tokenization_qwen.py`'s special
    /// tokens: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0..204|>`, and for Qwen-VL
    /// (`image_span` given) the tags `<ref>` ... `<imgpad>` after them. Qwen-VL numbers them from
    /// the number of ranks, Qwen (1) from its fixed `SPECIAL_START_ID` 151643 (the releases' number
    /// of ranks either way). `image_span` is the model's `visual.n_queries`, the
    /// [`QWEN_VL_IMAGE_SPAN`] of tokenization_qwen.py in every release.
    pub fn qwen(path: &Path, image_span: Option<usize>) -> Result<Tiktoken> {
        let vision = image_span.is_some();
        let ranks = read_ranks(path)?;
        let n = ranks.len() as u32;
        let first = if vision { n } else { QWEN_SPECIAL_START_ID };
        if n > first {
            bail!(
                "{}: {n} tokens; Qwen's tokenization_qwen.py numbers its special tokens from {first}, \
                 which would collide with them",
                path.display()
            );
        }
        let mut names = qwen_specials();
        if vision {
            names.extend(QWEN_VL_TAGS.map(String::from));
        }
        let specials: Vec<(String, u32)> = names.into_iter().zip(first..).collect();
        let mut t = Tiktoken::new(path.to_path_buf(), ranks, &specials, QWEN_PATTERN)?;
        if let Some(span) = image_span {
            let id = |name: &str| t.specials[name];
            t.image_tags = Some(ImageTags { start: id("<img>"), end: id("</img>"), pad: id("<imgpad>"), span });
        }
        Ok(t)
    }

    /// tiktoken's `encode_ordinary` of a stretch without special tokens.
    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        for m in self.pattern.find_iter(text) {
            let piece = m.map_err(|e| anyhow!("{}: the pre-tokenizer regex failed: {e}", self.path.display()))?;
            let bytes = piece.as_str().as_bytes();
            if let Some(&id) = self.ranks.get(bytes) {
                out.push(id);
                continue;
            }
            let bounds = byte_pair_merge(&self.ranks, bytes);
            for w in bounds.windows(2) {
                let part = &bytes[w[0]..w[1]];
                let id = self.ranks.get(part).with_context(|| {
                    format!(
                        "{}: the bytes {part:?} have no rank (the vocabulary lacks single bytes)",
                        self.path.display()
                    )
                })?;
                out.push(*id);
            }
        }
        Ok(())
    }

    /// The ids of `text` as `tokenization_qwen.py`'s `tokenize` makes them: NFC, every special
    /// token recognised, Qwen-VL's images spelled out ([`Self::spell_images`]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut normalized = tokenizers::NormalizedString::from(text);
        normalized.nfc();
        let text = normalized.get();
        let mut out = Vec::new();
        let mut start = 0;
        if let Some(re) = &self.special_re {
            for m in re.find_iter(text) {
                let m = m.map_err(|e| anyhow!("{}: the special-token regex failed: {e}", self.path.display()))?;
                self.encode_ordinary(&text[start..m.start()], &mut out)?;
                out.push(self.specials[m.as_str()]);
                start = m.end();
            }
        }
        self.encode_ordinary(&text[start..], &mut out)?;
        match self.image_tags {
            Some(tags) => self.spell_images(&out, tags),
            None => Ok(out),
        }
    }

    /// `tokenization_qwen.py`'s `_encode_imgurl` on every `<img>` ... `</img>`: the tokens between
    /// become the bytes of their text as ids, then `<imgpad>` up to the image's span.
    fn spell_images(&self, ids: &[u32], tags: ImageTags) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut rest = ids;
        while let Some(open) = rest.iter().position(|&t| t == tags.start) {
            out.extend_from_slice(&rest[..open]);
            let Some(len) = rest[open + 1..].iter().position(|&t| t == tags.end) else {
                bail!("the prompt's <img> (image start token {}) is not closed by </img>", tags.start);
            };
            let mut url = Vec::new();
            for &t in &rest[open + 1..open + 1 + len] {
                match self.decoder.get(t as usize) {
                    Some(bytes) => url.extend_from_slice(bytes),
                    None => bail!(
                        "the image reference between <img> and </img> holds the special token {}; \
                         it holds an image path or URL",
                        self.special_names.get(&t).map_or("?", String::as_str)
                    ),
                }
            }
            if url.len() > tags.span {
                bail!(
                    "the image reference between <img> and </img> has {} bytes, more than the {} positions of \
                     an image",
                    url.len(),
                    tags.span
                );
            }
            out.push(tags.start);
            out.extend(url.iter().map(|&b| u32::from(b)));
            out.extend(std::iter::repeat_n(tags.pad, tags.span - url.len()));
            out.push(tags.end);
            rest = &rest[open + len + 2..];
        }
        out.extend_from_slice(rest);
        Ok(out)
    }

    /// The id of a special token, or of a token given as its text.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.specials.get(token).or_else(|| self.ranks.get(token.as_bytes())).copied()
    }

    /// The text of a token (special tokens by name; other tokens' bytes read as UTF-8, lossily).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.special_names
            .get(&id)
            .cloned()
            .or_else(|| self.decoder.get(id as usize).map(|b| String::from_utf8_lossy(b).into_owned()))
    }

    /// The text of `ids` (invalid UTF-8 replaced, as `errors="replace"`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            match (self.decoder.get(id as usize), self.special_names.get(&id)) {
                (Some(b), _) => bytes.extend_from_slice(b),
                (None, Some(s)) => bytes.extend_from_slice(s.as_bytes()),
                (None, None) => bail!("{}: no token has id {id}", self.path.display()),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64_decode("IQ==").unwrap(), b"!");
        assert_eq!(base64_decode("IHRoZQ==").unwrap(), b" the");
        assert_eq!(base64_decode("5L2g5aW9").unwrap(), "你好".as_bytes());
        assert_eq!(base64_decode("+/8=").unwrap(), [0xfb, 0xff]);
        assert!(base64_decode("a").is_none() && base64_decode("a$==").is_none());
    }

    /// A hand-made vocabulary: the byte-pair merge takes the lowest-ranked adjacent pair each
    /// time (tiktoken's rule): "abcd" with ranks bc < ab < cd < abc < bcd first joins bc, then
    /// a+bc (abc) before bc+d (bcd); a whole piece in the vocabulary is one token.
    #[test]
    fn merges_follow_the_lowest_rank() {
        let mut ranks: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for t in ["bc", "ab", "cd", "abc", "bcd"] {
            ranks.push(t.as_bytes().to_vec());
        }
        let t = Tiktoken::new("test".into(), ranks, &[("<s>".to_string(), 261)], QWEN_PATTERN).unwrap();
        let (bc, abc) = (256, 259);
        assert_eq!(t.encode("abcd").unwrap(), vec![abc, u32::from(b'd')]);
        assert_eq!(t.encode("bcd").unwrap(), vec![260]);
        assert_eq!(t.encode("bc").unwrap(), vec![bc]);
        assert_eq!(t.encode("ab<s>cd").unwrap(), vec![257, 261, 258]);
        assert_eq!(t.decode(&[abc, u32::from(b'd'), 261]).unwrap(), "abcd<s>");
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_tiktoken").join(name)
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn texts(v: &serde_json::Value) -> Vec<String> {
        v.as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
    }

    fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
        serde_json::from_value(v.clone()).unwrap()
    }

    fn assert_encodes(t: &Tiktoken, texts: &[String], want: &[Vec<u32>], what: &str) {
        assert_eq!(texts.len(), want.len());
        for (text, want) in texts.iter().zip(want) {
            assert_eq!(&t.encode(text).unwrap(), want, "{what}: {text:?}");
        }
    }

    /// tests/fixtures/qwen_tiktoken: a small vocabulary trained by tests/fixtures/gen/qwen_tiktoken.py,
    /// and the ids of varied texts (English, Chinese, digits, whitespace runs, emoji, code, NFC,
    /// special tokens, Qwen-VL's image, box and ref tags) computed there by tiktoken with Qwen (1)'s
    /// special tokens, and by Qwen-VL's own tokenization_qwen.py (its image span set to 16, the
    /// qwen_vl fixture's n_queries, for the queries).
    #[test]
    fn small_vocabulary_matches_tiktoken_and_tokenization_qwen() {
        let want = read_json(&fixture("small.json"));
        let cases = texts(&want["cases"]);
        let path = fixture("qwen.tiktoken");
        let qwen1 = Tiktoken::qwen(&path, None).unwrap();
        assert_eq!(qwen1.token_to_id("<|endoftext|>"), Some(QWEN_SPECIAL_START_ID));
        assert_encodes(&qwen1, &cases, &ids(&want["qwen1"]), "qwen1");
        let vl = Tiktoken::qwen(&path, Some(QWEN_VL_IMAGE_SPAN)).unwrap();
        assert_eq!(vl.image_tags.map(|t| (t.start, t.end, t.pad)), Some((990, 991, 992)));
        assert_eq!(vl.token_to_id("<|endoftext|>"), Some(776));
        assert_encodes(&vl, &cases, &ids(&want["qwen_vl"]), "qwen_vl");
        let vl16 = Tiktoken::qwen(&path, Some(16)).unwrap();
        assert_encodes(&vl16, &texts(&want["queries"]), &ids(&want["qwen_vl_queries_16"]), "qwen_vl queries");
        // What does not round-trip through ids is only the NFC composition.
        for (text, ids) in cases.iter().zip(ids(&want["qwen1"])) {
            let mut nfc = tokenizers::NormalizedString::from(text.as_str());
            nfc.nfc();
            assert_eq!(qwen1.decode(&ids).unwrap(), nfc.get(), "{text:?}");
        }
    }

    /// The release's qwen.tiktoken (Qwen-VL-Chat's, the same as Qwen (1)'s), when this machine has
    /// it: LAMINA_QWEN_TIKTOKEN, or ../shared/tokenizers/qwen_vl/qwen.tiktoken. It is not in the
    /// repository (Tongyi Qianwen license); the expected ids are, from tokenization_qwen.py and
    /// qwen_generation_utils.make_context (the chat prompt around an image and a box).
    #[test]
    fn release_vocabulary_matches_tokenization_qwen() {
        let path = std::env::var_os("LAMINA_QWEN_TIKTOKEN").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tokenizers/qwen_vl/qwen.tiktoken")
        });
        if !path.is_file() {
            eprintln!("skipped: no release qwen.tiktoken at {} (set LAMINA_QWEN_TIKTOKEN)", path.display());
            return;
        }
        let want = read_json(&fixture("release.json"));
        let what = format!("{} (expected the release file, sha256 {})", path.display(), want["sha256"]);
        let cases = texts(&want["cases"]);
        let qwen1 = Tiktoken::qwen(&path, None).unwrap();
        assert_encodes(&qwen1, &cases, &ids(&want["qwen1"]), &format!("qwen1 {what}"));
        let vl = Tiktoken::qwen(&path, Some(QWEN_VL_IMAGE_SPAN)).unwrap();
        assert_eq!(vl.image_tags.map(|t| t.start), Some(151857), "{what}");
        assert_encodes(&vl, &cases, &ids(&want["qwen_vl"]), &format!("qwen_vl {what}"));
        assert_encodes(&vl, &texts(&want["queries"]), &ids(&want["qwen_vl_queries"]), &what);
        assert_encodes(&vl, &texts(&want["chats"]), &ids(&want["chat_ids"]), &what);
    }

    /// tokenization_qwen.py's refusals: an unclosed `<img>`, a reference longer than the span, a
    /// special token inside it.
    #[test]
    fn bad_image_references_are_refused() {
        let vl = Tiktoken::qwen(&fixture("qwen.tiktoken"), Some(16)).unwrap();
        for (text, want) in [
            ("Picture 1:<img>a.png", "not closed by </img>"),
            ("<img>a-very-long-file-name.png</img>", "has 25 bytes, more than the 16 positions"),
            ("<img>a<|im_end|>b</img>", "holds the special token <|im_end|>"),
        ] {
            let e = format!("{:#}", vl.encode(text).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
        // Qwen (1) reads the tags as text.
        let qwen1 = Tiktoken::qwen(&fixture("qwen.tiktoken"), None).unwrap();
        assert!(qwen1.encode("Picture 1:<img>a.png").unwrap().iter().all(|&t| t < 776));
    }

    #[test]
    fn bad_rank_files_are_named() {
        let dir = std::env::temp_dir().join(format!("lamina-tiktoken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qwen.tiktoken");
        for (body, want) in [
            ("IQ== 0\nIg== 2\n", "no token has rank 1"),
            ("IQ== 0\nIQ== 1\n", "also on line 1"),
            ("IQ== 0\nIg== 0\n", "rank 0 is given twice"),
            ("IQ== x\n", "not a number"),
            ("I$== 0\n", "not base64"),
            ("IQ==\n", "expected `base64-token rank`"),
            ("\n", "no tokens"),
        ] {
            std::fs::write(&path, body).unwrap();
            let e = format!("{:#}", read_ranks(&path).unwrap_err());
            assert!(e.contains("qwen.tiktoken") && e.contains(want), "{body:?}: {e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
