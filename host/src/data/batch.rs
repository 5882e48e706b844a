//! Batching: the seeded order in which examples are visited, and collation of examples into a
//! padded [`Batch`] on a device.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::tokenize::{Example, ExampleLabels};
use crate::model::Batch;
use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};

/// Pads `examples` on the right to the longest of them and builds a [`Batch`] on `device`:
/// `input_ids` and `attention_mask` `[b, s]` (u32), `labels` `[b]` (classes) or `[b, s]` (token
/// labels, [`IGNORE_INDEX`] on padding), both i64.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let Some(first) = examples.first() else {
        return Err(Error::config("cannot build a batch from no examples"));
    };
    let b = examples.len();
    let s = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if s == 0 {
        return Err(Error::config("cannot build a batch of empty examples"));
    }
    let mut ids = vec![pad_id; b * s];
    let mut mask = vec![0u32; b * s];
    let mut num_tokens = 0;
    for (row, example) in examples.iter().enumerate() {
        let n = example.len();
        ids[row * s..row * s + n].copy_from_slice(&example.input_ids);
        mask[row * s..row * s + n].fill(1);
        num_tokens += n;
    }
    let labels = match &first.labels {
        ExampleLabels::Class(_) => {
            let classes = examples
                .iter()
                .map(|e| match e.labels {
                    ExampleLabels::Class(c) => Ok(c),
                    ExampleLabels::Tokens(_) => Err(mixed()),
                })
                .collect::<Result<Vec<i64>>>()?;
            Tensor::from_vec(classes, b, device)?
        }
        ExampleLabels::Tokens(_) => {
            let mut labels = vec![IGNORE_INDEX; b * s];
            for (row, example) in examples.iter().enumerate() {
                let ExampleLabels::Tokens(l) = &example.labels else {
                    return Err(mixed());
                };
                if l.len() != example.len() {
                    return Err(Error::config(format!(
                        "example {row} of the batch has {} labels for {} tokens",
                        l.len(),
                        example.len()
                    )));
                }
                labels[row * s..row * s + l.len()].copy_from_slice(l);
            }
            Tensor::from_vec(labels, (b, s), device)?
        }
    };
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        attention_mask: Tensor::from_vec(mask, (b, s), device)?,
        labels,
        num_tokens,
    })
}

fn mixed() -> Error {
    Error::config("a batch mixes classification and language-modelling examples")
}

/// The order in which an epoch visits examples, split into batches.
///
/// With shuffling, the order of epoch `e` depends only on the seed and `e`, so a run resumed at
/// epoch `e` sees exactly the batches the interrupted run would have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOrder {
    len: usize,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
}

impl BatchOrder {
    /// A shuffled order of `len` examples in batches of `batch_size`, seeded by `seed`.
    pub fn shuffled(len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        Self::check(batch_size)?;
        Ok(Self {
            len,
            batch_size,
            seed,
            shuffle: true,
            drop_last: false,
        })
    }

    /// The examples in their stored order (evaluation).
    pub fn sequential(len: usize, batch_size: usize) -> Result<Self> {
        Self::check(batch_size)?;
        Ok(Self {
            len,
            batch_size,
            seed: 0,
            shuffle: false,
            drop_last: false,
        })
    }

    fn check(batch_size: usize) -> Result<()> {
        if batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        Ok(())
    }

    /// Drops a last batch smaller than `batch_size` (when `drop` is true).
    pub fn with_drop_last(mut self, drop: bool) -> Self {
        self.drop_last = drop;
        self
    }

    /// Number of batches in an epoch.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    /// The batches of epoch `epoch` (0-based): lists of example indices.
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let stream = self.seed
                ^ (epoch as u64)
                    .wrapping_add(1)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            order.shuffle(&mut StdRng::seed_from_u64(stream));
        }
        order
            .chunks(self.batch_size)
            .filter(|c| !self.drop_last || c.len() == self.batch_size)
            .map(<[usize]>::to_vec)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    fn lm(ids: &[u32], labels: &[i64]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels: ExampleLabels::Tokens(labels.to_vec()),
        }
    }

    #[test]
    fn collate_pads_right_and_masks_labels() {
        let a = lm(&[5, 6, 7], &[-100, 6, 7]);
        let b = lm(&[8], &[8]);
        let batch = collate(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7], vec![8, 0, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().unwrap(),
            vec![vec![1, 1, 1], vec![1, 0, 0]]
        );
        assert_eq!(batch.labels.dtype(), DType::I64);
        assert_eq!(
            batch.labels.to_vec2::<i64>().unwrap(),
            vec![vec![-100, 6, 7], vec![8, -100, -100]]
        );
        assert_eq!(batch.num_tokens, 4);
    }

    #[test]
    fn collate_classes() {
        let a = Example {
            input_ids: vec![1, 2],
            labels: ExampleLabels::Class(1),
        };
        let b = Example {
            input_ids: vec![1, 2, 3, 4],
            labels: ExampleLabels::Class(0),
        };
        let batch = collate(&[&a, &b], 9, &Device::Cpu).unwrap();
        assert_eq!(batch.labels.to_vec1::<i64>().unwrap(), vec![1, 0]);
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap()[0],
            vec![1, 2, 9, 9]
        );
        let c = lm(&[1], &[1]);
        assert!(collate(&[&a, &c], 0, &Device::Cpu).is_err());
        assert!(collate(&[], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn batch_order_is_a_seeded_permutation_per_epoch() {
        let order = BatchOrder::shuffled(10, 3, 7).unwrap();
        let e0 = order.batches(0);
        assert_eq!(e0.len(), 4);
        assert_eq!(order.num_batches(), 4);
        let mut all: Vec<usize> = e0.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(e0, BatchOrder::shuffled(10, 3, 7).unwrap().batches(0));
        assert_ne!(e0, order.batches(1));
        assert_ne!(e0, BatchOrder::shuffled(10, 3, 8).unwrap().batches(0));
        let dropped = order.with_drop_last(true);
        assert_eq!(dropped.batches(0).len(), 3);
        assert_eq!(dropped.num_batches(), 3);
        assert_eq!(
            BatchOrder::sequential(5, 2).unwrap().batches(3),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        assert!(BatchOrder::shuffled(5, 0, 1).is_err());
    }
}
