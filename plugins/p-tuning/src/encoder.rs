//! PEFT's `PromptEncoder` with the MLP head: a virtual-token embedding reparameterised by
//! `Linear → ReLU → Linear → ReLU → Linear`, its parameters model-level (saved under their bare
//! names, PEFT's module names without the adapter name).

use whetstone_sdk::prelude::*;

/// The virtual-token embedding `[n, token_dim]`.
pub const EMBEDDING: &str = "prompt_encoder.embedding.weight";

/// The linear layers of `mlp_head` (PEFT's `nn.Sequential` indices; 1 and 3 are the ReLUs)
/// with their input and output widths for tokens `token_dim` wide and an MLP `hidden` wide.
fn layers(token_dim: usize, hidden: usize) -> [(usize, usize, usize); 3] {
    [
        (0, token_dim, hidden),
        (2, hidden, hidden),
        (4, hidden, token_dim),
    ]
}

fn weight(index: usize) -> String {
    format!("prompt_encoder.mlp_head.{index}.weight")
}

fn bias(index: usize) -> String {
    format!("prompt_encoder.mlp_head.{index}.bias")
}

/// Creates the encoder's parameters with PyTorch's defaults: the embedding N(0, 1)
/// (`nn.Embedding`), each linear weight `kaiming_uniform_(a = √5)` and bias uniform in
/// `±1/√in` (`nn.Linear`).
pub fn create(tokens: usize, token_dim: usize, hidden: usize) -> Result<()> {
    let normal = Init::Normal {
        mean: 0.0,
        std: 1.0,
    };
    whet_host::add_param("", EMBEDDING, &[tokens, token_dim], normal)?;
    for (index, fan_in, out) in layers(token_dim, hidden) {
        whet_host::add_param("", &weight(index), &[out, fan_in], Init::kaiming_uniform())?;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let uniform = Init::Uniform {
            low: -bound,
            high: bound,
        };
        whet_host::add_param("", &bias(index), &[out], uniform)?;
    }
    Ok(())
}

/// `x · Wᵀ + b` for `mlp_head.<index>`.
fn linear(x: &Tensor, index: usize) -> Result<Tensor> {
    let w = whet_host::param("", &weight(index))?;
    let b = whet_host::param("", &bias(index))?;
    x.matmul_t(w)?.add(b)
}

/// The virtual tokens `[n, token_dim]`: `mlp_head(embedding)`.
pub fn forward() -> Result<Tensor> {
    let x = whet_host::param("", EMBEDDING)?;
    let x = linear(&x, 0)?.relu()?;
    let x = linear(&x, 2)?.relu()?;
    linear(&x, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every parameter name, in creation order.
    fn param_names() -> Vec<String> {
        let mut names = vec![EMBEDDING.to_string()];
        for (index, _, _) in layers(1, 1) {
            names.push(weight(index));
            names.push(bias(index));
        }
        names
    }

    #[test]
    fn names_follow_peft_module_paths() {
        assert_eq!(
            param_names(),
            [
                "prompt_encoder.embedding.weight",
                "prompt_encoder.mlp_head.0.weight",
                "prompt_encoder.mlp_head.0.bias",
                "prompt_encoder.mlp_head.2.weight",
                "prompt_encoder.mlp_head.2.bias",
                "prompt_encoder.mlp_head.4.weight",
                "prompt_encoder.mlp_head.4.bias",
            ]
        );
        assert_eq!(layers(8, 3), [(0, 8, 3), (2, 3, 3), (4, 3, 8)]);
    }
}
