//! TODO(assets): filled in by its owner.
