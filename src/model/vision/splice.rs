//! Where the image embeddings meet the text: they replace the token embeddings at the image
//! tokens (`masked_scatter` in transformers), and Qwen3-VL adds its deepstack features to the
//! hidden states at the same places after each of the first text layers.

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView2};
use serde_json::Value;

/// The image placeholder token: `image_token_id` (Qwen), `image_token_index` (LLaVA),
/// `img_context_token_id` (InternVL; the releases' config.json leaves it to the tokenizer's
/// `<IMG_CONTEXT>`, which calibration looks up and which inputs files must use).
pub fn image_token_id(config: &Value) -> Result<i64> {
    let text = config.get("text_config");
    ["image_token_id", "image_token_index", "img_context_token_id"]
        .iter()
        .find_map(|k| config.get(*k).or_else(|| text.and_then(|t| t.get(*k))).and_then(|v| v.as_i64()))
        .context("config.json names no image token (image_token_id, image_token_index or img_context_token_id)")
}

/// Where a sequence's image embeddings go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageSlots {
    /// At every image (placeholder) token, in order (`masked_scatter` in transformers).
    Token(i64),
    /// Qwen-VL: at every position strictly between an image start token and the next image end
    /// token, whatever their ids (modeling_qwen.py `hidden_states[i][a + 1 : b] = images[idx]`;
    /// its tokenizer writes the image's path there as byte ids, then image pads).
    Between { start: i64, end: i64 },
}

impl ImageSlots {
    /// The slots a model's config names: Qwen-VL's `visual.image_start_id` (the end is the next
    /// id, as in modeling_qwen.py), else the image token ([`image_token_id`]).
    pub fn of(config: &Value) -> Result<ImageSlots> {
        if let Some(start) = config.get("visual").and_then(|v| v.get("image_start_id")).and_then(Value::as_i64) {
            return Ok(ImageSlots::Between { start, end: start + 1 });
        }
        Ok(ImageSlots::Token(image_token_id(config)?))
    }

    /// The ids that mark an image in a sequence (a sequence without images must hold none).
    pub fn marker(&self) -> i64 {
        match *self {
            ImageSlots::Token(t) => t,
            ImageSlots::Between { start, .. } => start,
        }
    }

    /// The positions the image embeddings replace, in order. Qwen-VL's spans must be closed and
    /// of one length (each image gives the same number of embeddings).
    pub fn positions(&self, input_ids: &[i64]) -> Result<Vec<usize>> {
        match *self {
            ImageSlots::Token(t) => Ok(image_positions(input_ids, t)),
            ImageSlots::Between { start, end } => {
                let mut out = Vec::new();
                let mut span_len = None;
                let mut open: Option<usize> = None;
                for (i, &t) in input_ids.iter().enumerate() {
                    if t == start {
                        if let Some(a) = open {
                            bail!("image start token {start} at position {i} inside the image opened at {a}");
                        }
                        open = Some(i);
                    } else if t == end {
                        let Some(a) = open.take() else {
                            bail!("image end token {end} at position {i} closes no image start token {start}");
                        };
                        let len = i - a - 1;
                        if *span_len.get_or_insert(len) != len {
                            bail!(
                                "the images of a sequence span {} and {len} tokens; each image gives the same number of embeddings",
                                span_len.unwrap()
                            );
                        }
                        out.extend(a + 1..i);
                    }
                }
                if let Some(a) = open {
                    bail!("the image start token {start} at position {a} has no end token {end}");
                }
                Ok(out)
            }
        }
    }
}

/// The positions of the image tokens in a sequence.
pub fn image_positions(input_ids: &[i64], image_token_id: i64) -> Vec<usize> {
    input_ids.iter().enumerate().filter(|(_, &t)| t == image_token_id).map(|(i, _)| i).collect()
}

/// Puts row `k` of `image_embeds` at the `k`-th image slot of `token_embeds` (`[tokens, hidden]`)
/// and returns the image positions. The slots must match the embeddings one to one.
pub fn splice_image_embeds(
    token_embeds: &mut Array2<f32>,
    input_ids: &[i64],
    slots: ImageSlots,
    image_embeds: ArrayView2<f32>,
) -> Result<Vec<usize>> {
    if token_embeds.nrows() != input_ids.len() {
        bail!("{} token embeddings for {} input ids", token_embeds.nrows(), input_ids.len());
    }
    let positions = slots.positions(input_ids)?;
    if positions.len() != image_embeds.nrows() {
        bail!(
            "image features and image tokens do not match: {} image tokens ({slots:?}), {} image embeddings",
            positions.len(),
            image_embeds.nrows()
        );
    }
    if image_embeds.ncols() != token_embeds.ncols() {
        bail!("image embeddings are {} wide, token embeddings {}", image_embeds.ncols(), token_embeds.ncols());
    }
    for (k, &p) in positions.iter().enumerate() {
        token_embeds.row_mut(p).assign(&image_embeds.row(k));
    }
    Ok(positions)
}

/// Qwen3-VL's DeepStack: after text layer `text_layer`, adds `deepstack[text_layer]` (if there is
/// one) to the hidden states (`[tokens, hidden]`) at the image positions.
pub fn add_deepstack(
    hidden: &mut Array2<f32>,
    image_positions: &[usize],
    text_layer: usize,
    deepstack: &[Array2<f32>],
) -> Result<()> {
    let Some(features) = deepstack.get(text_layer) else {
        return Ok(());
    };
    if features.dim() != (image_positions.len(), hidden.ncols()) {
        bail!(
            "deepstack feature {text_layer} has shape {:?}, the sequence has {} image tokens of width {}",
            features.dim(),
            image_positions.len(),
            hidden.ncols()
        );
    }
    for (k, &p) in image_positions.iter().enumerate() {
        let mut row = hidden.row_mut(p);
        row += &features.row(k);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;
    use serde_json::json;

    #[test]
    fn splice_replaces_image_tokens_in_order() {
        let mut e = Array2::<f32>::zeros((4, 2));
        let img = array![[1.0f32, 2.0], [3.0, 4.0]];
        let pos = splice_image_embeds(&mut e, &[5, 9, 7, 9], ImageSlots::Token(9), img.view()).unwrap();
        assert_eq!(pos, vec![1, 3]);
        assert_eq!(e, array![[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]);
        let err = splice_image_embeds(&mut e, &[5, 9, 7, 7], ImageSlots::Token(9), img.view()).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
    }

    /// Qwen-VL: everything between `<img>` and `</img>`, path bytes included, as modeling_qwen.py.
    #[test]
    fn qwen_vl_splices_between_image_start_and_end() {
        let slots = ImageSlots::of(&json!({"visual": {"image_start_id": 50}})).unwrap();
        assert_eq!(slots, ImageSlots::Between { start: 50, end: 51 });
        assert_eq!(slots.positions(&[1, 50, 97, 52, 51, 3, 50, 52, 52, 51]).unwrap(), vec![2, 3, 7, 8]);
        let mut e = Array2::<f32>::zeros((5, 1));
        let img = array![[1.0f32], [2.0]];
        splice_image_embeds(&mut e, &[7, 50, 46, 52, 51], slots, img.view()).unwrap();
        assert_eq!(e, array![[0.0], [0.0], [1.0], [2.0], [0.0]]);
        for bad in [&[50, 1, 50, 51][..], &[1, 51], &[50, 1], &[50, 1, 51, 50, 1, 1, 51]] {
            assert!(slots.positions(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ImageSlots::of(&json!({"image_token_id": 5})).unwrap(), ImageSlots::Token(5));
    }

    #[test]
    fn deepstack_adds_only_where_it_exists() {
        let mut h = Array2::<f32>::ones((3, 1));
        let ds = vec![array![[10.0f32]]];
        add_deepstack(&mut h, &[2], 0, &ds).unwrap();
        add_deepstack(&mut h, &[2], 1, &ds).unwrap();
        assert_eq!(h, array![[1.0], [1.0], [11.0]]);
        assert!(add_deepstack(&mut h, &[1, 2], 0, &ds).is_err());
    }

    #[test]
    fn both_spellings_of_the_image_token() {
        assert_eq!(image_token_id(&json!({"image_token_id": 5})).unwrap(), 5);
        assert_eq!(image_token_id(&json!({"image_token_index": 32000})).unwrap(), 32000);
        assert!(image_token_id(&json!({})).is_err());
    }
}
