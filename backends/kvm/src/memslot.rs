//! KVM memslot ids: a free list bounded by `KVM_CAP_NR_MEMSLOTS`, and the
//! mapping of KVM's memslot errors to [`KvmError`].

use crate::KvmError;

/// Memslot ids `0..max`, lowest free id first.
///
/// # Locking
/// None inside; the mirror keeps it under its layout lock.
#[derive(Debug)]
pub struct SlotTable {
    max: u32,
    /// Ids below `next` that were released, reused first.
    free: Vec<u32>,
    /// Ids `next..max` were never handed out.
    next: u32,
}

impl SlotTable {
    /// Ids `0..max` (KVM's `KVM_CAP_NR_MEMSLOTS`, 32,764 here).
    pub fn new(max: u32) -> Self {
        Self {
            max,
            free: Vec::new(),
            next: 0,
        }
    }

    /// The number of ids.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Ids in use.
    pub fn used(&self) -> u32 {
        self.next - self.free.len() as u32
    }

    /// Take a free id.
    ///
    /// # Errors
    /// [`KvmError::OutOfSlots`] when all `max` ids are in use.
    pub fn alloc(&mut self) -> Result<u32, KvmError> {
        if let Some(id) = self.free.pop() {
            return Ok(id);
        }
        if self.next == self.max {
            return Err(KvmError::OutOfSlots(self.max));
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Give an id back. Ids not handed out are ignored.
    pub fn release(&mut self, id: u32) {
        if id < self.next && !self.free.contains(&id) {
            self.free.push(id);
        }
    }
}

/// Map a `KVM_SET_USER_MEMORY_REGION` error.
pub(crate) fn slot_error(e: kvm_ioctls::Error, slot: u32, gpa: u64, len: u64) -> KvmError {
    match e.errno() {
        libc::EEXIST => KvmError::Overlap { gpa, len },
        libc::EINVAL => KvmError::InvalidSlot {
            slot,
            gpa,
            len,
            source: e,
        },
        _ => KvmError::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_list_reuses_and_bounds() {
        let mut t = SlotTable::new(3);
        assert_eq!(
            (t.alloc().unwrap(), t.alloc().unwrap(), t.alloc().unwrap()),
            (0, 1, 2)
        );
        assert!(matches!(t.alloc(), Err(KvmError::OutOfSlots(3))));
        t.release(1);
        t.release(1);
        t.release(7);
        assert_eq!(t.used(), 2);
        assert_eq!(t.alloc().unwrap(), 1);
        assert!(t.alloc().is_err());
    }
}
