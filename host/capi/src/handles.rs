//! Generational handle tables: every object the C side holds is a 64-bit id, so a stale,
//! freed, forged or wrong-kind handle is a detected error instead of undefined behaviour.
//!
//! Layout of a handle: bits 56..64 the table's kind, bits 32..56 the slot index plus one, bits
//! 0..32 the slot's generation (bumped each time the slot is freed). 0 is never a valid handle.

use std::sync::{Arc, Mutex, MutexGuard};

/// Largest slot index a handle can name (24 bits, minus the zero handle).
const MAX_SLOTS: usize = (1 << 24) - 1;

struct Slot<T> {
    generation: u32,
    value: Option<Arc<T>>,
}

/// A table of live objects of one kind, addressed by generational handles.
pub struct HandleTable<T> {
    kind: u8,
    slots: Mutex<Vec<Slot<T>>>,
}

impl<T> HandleTable<T> {
    /// An empty table whose handles carry `kind` (distinct per table).
    pub const fn new(kind: u8) -> Self {
        Self {
            kind,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot<T>>> {
        // The table's invariants hold between statements, so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, index: usize, generation: u32) -> u64 {
        (u64::from(self.kind) << 56) | (((index as u64) + 1) << 32) | u64::from(generation)
    }

    /// The slot index and generation `handle` names in this table, if it is one of its handles.
    fn decode(&self, handle: u64) -> Option<(usize, u32)> {
        if (handle >> 56) as u8 != self.kind {
            return None;
        }
        let index = ((handle >> 32) & 0xFF_FFFF) as usize;
        (index > 0).then(|| (index - 1, handle as u32))
    }

    /// Stores `value` and returns its handle (`None` when the table is full).
    pub fn insert(&self, value: T) -> Option<u64> {
        let mut slots = self.slots();
        let value = Some(Arc::new(value));
        if let Some(index) = slots.iter().position(|s| s.value.is_none()) {
            let slot = &mut slots[index];
            slot.value = value;
            return Some(self.handle(index, slot.generation));
        }
        if slots.len() >= MAX_SLOTS {
            return None;
        }
        slots.push(Slot {
            generation: 1,
            value,
        });
        Some(self.handle(slots.len() - 1, 1))
    }

    /// The live object `handle` names.
    pub fn get(&self, handle: u64) -> Option<Arc<T>> {
        let (index, generation) = self.decode(handle)?;
        let slots = self.slots();
        let slot = slots.get(index)?;
        (slot.generation == generation)
            .then(|| slot.value.clone())
            .flatten()
    }

    /// Frees the object `handle` names and returns it; the handle (and every copy of it) is
    /// stale afterwards.
    pub fn remove(&self, handle: u64) -> Option<Arc<T>> {
        let (index, generation) = self.decode(handle)?;
        let mut slots = self.slots();
        let slot = slots.get_mut(index)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1).max(1);
        Some(value)
    }

    /// Number of live objects.
    pub fn len(&self) -> usize {
        self.slots().iter().filter(|s| s.value.is_some()).count()
    }

    /// Whether the table holds no live object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn freed_stale_forged_and_foreign_handles_are_refused() {
        let table = HandleTable::new(7);
        let other: HandleTable<&str> = HandleTable::new(8);
        let a = table.insert("a").unwrap();
        assert_ne!(a, 0);
        assert_eq!(*table.get(a).unwrap(), "a");
        assert!(table.get(0).is_none());
        assert!(table.get(a + 1).is_none(), "wrong generation");
        assert!(table.get(a + (1 << 32)).is_none(), "an unused slot");
        assert!(other.get(a).is_none(), "a handle of another table");
        assert_eq!(*table.remove(a).unwrap(), "a");
        assert!(table.get(a).is_none(), "freed");
        assert!(table.remove(a).is_none(), "double free");
        // The slot is reused under a new generation: the old handle stays stale.
        let b = table.insert("b").unwrap();
        assert_eq!(a >> 32, b >> 32);
        assert_ne!(a, b);
        assert!(table.get(a).is_none());
        assert_eq!(*table.get(b).unwrap(), "b");
        assert_eq!(table.len(), 1);
    }
}
