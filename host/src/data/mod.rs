//! Data path: records, tokenization, masking, batching.
