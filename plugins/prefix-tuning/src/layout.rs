//! Where each layer's keys and values sit in a flattened prefix row, as PEFT's `get_prompt`
//! reads it: a row of `num_layers · 2 · token_dim` values is viewed as
//! `[num_layers · 2, kv_heads, head_dim]`, and slot `2i` holds layer `i`'s keys, slot `2i + 1`
//! its values (`view(b, n, L·2, heads, head_dim).permute(2, 0, 3, 1, 4).split(2)`).

use whetstone_sdk::prelude::*;

/// The attention shape a prefix is laid out for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Attention layers.
    pub layers: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
}

impl Layout {
    /// Key (or value) width of one layer, `kv_heads · head_dim` (PEFT's `token_dim`).
    pub fn token_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Width of a flattened prefix row: every layer's keys and values.
    pub fn width(&self) -> usize {
        self.layers * 2 * self.token_dim()
    }

    /// The first column of layer `layer`'s keys; its values follow right after, so the
    /// `2 · token_dim` columns from here hold both.
    pub fn layer_start(&self, layer: usize) -> Result<usize> {
        if layer >= self.layers {
            return Err(Error::msg(format!(
                "attention prefix asked for layer {layer} of a {}-layer model",
                self.layers
            )));
        }
        Ok(2 * layer * self.token_dim())
    }

    /// Keys and values `[batch, kv_heads, n, head_dim]` from one layer's columns `[n, 2 ·
    /// token_dim]` (keys first).
    pub fn split(&self, columns: &Tensor, batch: usize) -> Result<(Tensor, Tensor)> {
        let d = self.token_dim();
        let n = columns.dim(0)?;
        let heads = |start: usize| -> Result<Tensor> {
            columns
                .narrow(1, start, d)?
                .reshape(&[n as i64, self.kv_heads as i64, self.head_dim as i64])?
                .transpose(0, 1)?
                .unsqueeze(0)?
                .broadcast_as(&[batch, self.kv_heads, n, self.head_dim])
        };
        Ok((heads(0)?, heads(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's flat column of (layer, keys or values, head, d) after its view and permute.
    fn peft_column(l: &Layout, layer: usize, value: bool, head: usize, d: usize) -> usize {
        let slot = 2 * layer + usize::from(value);
        (slot * l.kv_heads + head) * l.head_dim + d
    }

    #[test]
    fn layer_columns_are_peft_slots() {
        let l = Layout {
            layers: 3,
            kv_heads: 2,
            head_dim: 4,
        };
        assert_eq!((l.token_dim(), l.width()), (8, 48));
        for layer in 0..l.layers {
            let start = l.layer_start(layer).unwrap();
            for head in 0..l.kv_heads {
                for d in 0..l.head_dim {
                    // `split` reads keys at start + head·head_dim + d, values one token_dim on.
                    let ours = start + head * l.head_dim + d;
                    assert_eq!(ours, peft_column(&l, layer, false, head, d));
                    assert_eq!(ours + l.token_dim(), peft_column(&l, layer, true, head, d));
                }
            }
        }
        assert!(l.layer_start(3).is_err());
    }
}
