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

/// The positions of the image tokens in a sequence.
pub fn image_positions(input_ids: &[i64], image_token_id: i64) -> Vec<usize> {
    input_ids.iter().enumerate().filter(|(_, &t)| t == image_token_id).map(|(i, _)| i).collect()
}

/// Puts row `k` of `image_embeds` at the `k`-th image token of `token_embeds` (`[tokens, hidden]`)
/// and returns the image positions. The image tokens must match the embeddings one to one.
pub fn splice_image_embeds(
    token_embeds: &mut Array2<f32>,
    input_ids: &[i64],
    image_token_id: i64,
    image_embeds: ArrayView2<f32>,
) -> Result<Vec<usize>> {
    if token_embeds.nrows() != input_ids.len() {
        bail!("{} token embeddings for {} input ids", token_embeds.nrows(), input_ids.len());
    }
    let positions = image_positions(input_ids, image_token_id);
    if positions.len() != image_embeds.nrows() {
        bail!(
            "image features and image tokens do not match: {} image tokens (id {image_token_id}), {} image embeddings",
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
        let pos = splice_image_embeds(&mut e, &[5, 9, 7, 9], 9, img.view()).unwrap();
        assert_eq!(pos, vec![1, 3]);
        assert_eq!(e, array![[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]);
        let err = splice_image_embeds(&mut e, &[5, 9, 7, 7], 9, img.view()).unwrap_err().to_string();
        assert!(err.contains("do not match"), "{err}");
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
