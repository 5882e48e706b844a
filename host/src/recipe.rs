//! TODO(recipe): filled in by its owner.
