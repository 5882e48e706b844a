//! How the virtual tokens start: PEFT's `TEXT` and `SAMPLE_VOCAB` inits copy rows of the base
//! model's input embedding matrix.

use whetstone_sdk::prelude::*;

/// Where the input embedding matrix `[vocab, hidden]` lives, by model family: Llama-style
/// decoders, then BERT-family encoders (the host's names, without a `bert.` prefix).
const WORD_EMBEDDINGS: &[&str] = &[
    "model.embed_tokens.weight",
    "embeddings.word_embeddings.weight",
];

/// PEFT's `TEXT` init ids: the text's tokens truncated to `count`, or repeated until there
/// are `count` of them.
pub fn repeat_to(ids: &[u32], count: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(count).collect()
}

/// `count` token ids drawn uniformly from `0..vocab`, from the host's seeded generator (so the
/// same attach seed gives the same tokens, natively and in wasm).
pub fn sample_vocab(count: usize, vocab: usize) -> Result<Vec<u32>> {
    if vocab == 0 {
        return Err(Error::config(
            "prompt_tuning_init = \"SAMPLE_VOCAB\": the model reports an empty vocabulary",
        ));
    }
    let noise = Tensor::zeros(&[2])?.randn_like(0.0, 1.0)?.to_vec()?;
    let seed = noise
        .iter()
        .fold(0u64, |acc, v| (acc << 32) | u64::from(v.to_bits()));
    let mut state = seed;
    Ok((0..count)
        .map(|_| {
            let x = splitmix64(&mut state);
            ((u128::from(x) * vocab as u128) >> 64) as u32
        })
        .collect())
}

/// One step of SplitMix64 (Steele, Lea and Flood 2014).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The base model's input embedding matrix `[vocab, hidden]`.
fn word_embeddings() -> Result<Tensor> {
    for name in WORD_EMBEDDINGS {
        if let Ok(t) = whet_host::base_param(name) {
            return Ok(t);
        }
    }
    Err(Error::config(format!(
        "cannot find the model's input embeddings (looked for {}) to initialise the virtual \
         tokens from; use prompt_tuning_init = \"RANDOM\"",
        WORD_EMBEDDINGS.join(", ")
    )))
}

/// The rows of the input embedding matrix for `ids` (`[ids.len(), hidden]`), checked against
/// the model's `vocab` size.
pub fn embedding_rows(ids: &[u32], model: &ModelInfo) -> Result<Tensor> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= model.vocab_size) {
        return Err(Error::config(format!(
            "prompt_tuning_init_token_ids holds token {bad}, outside the model's vocabulary of {}",
            model.vocab_size
        )));
    }
    let weight = word_embeddings()?;
    // f32 holds every id below 2^24 exactly.
    let index: Vec<f32> = ids.iter().map(|&id| id as f32).collect();
    let index =
        Tensor::from_slice(&index, &[ids.len()])?.to_dtype(whetstone_sdk::types::DType::U32)?;
    weight.index_select(&index, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ids_are_cut_or_repeated_as_peft_does() {
        assert_eq!(repeat_to(&[1, 2, 3], 2), vec![1, 2]);
        assert_eq!(repeat_to(&[1, 2, 3], 7), vec![1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(repeat_to(&[4], 3), vec![4, 4, 4]);
    }

    #[test]
    fn splitmix_is_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 0 (the reference implementation).
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(&mut s), 0x6e78_9e6a_a1b9_65f4);
    }
}
