//! [`DirtyBitmap`]: one region's dirty pages, merged from KVM's dirty log
//! and the writes the mirror itself saw.

use notifier_core::PAGE_SHIFT;

/// Dirty pages of one region: bit `i` is page `gpa + i * PAGE_SIZE`.
///
/// Sources merged by [`crate::KvmMirror::dirty_log`]:
///
/// | source | what sets the bit |
/// |--------|-------------------|
/// | KVM dirty log (`KVM_MEM_LOG_DIRTY_PAGES`) | guest writes through a writable host-view page |
/// | write faults | a guest write to a hole or read-only page (after a soft-dirty write-protect), served by the mirror |
/// | VMM writes | writable slices handed out by [`crate::DeviceView`] |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    gpa: u64,
    pages: usize,
    bits: Vec<u64>,
}

impl DirtyBitmap {
    pub(crate) fn new(gpa: u64, pages: usize, mut bits: Vec<u64>) -> Self {
        bits.resize(pages.div_ceil(64), 0);
        Self { gpa, pages, bits }
    }

    /// Guest-physical base of the region.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The raw words (64 pages each, little-endian bit order like KVM's).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// Whether the page holding `gpa` is dirty (false outside the region).
    pub fn is_dirty(&self, gpa: u64) -> bool {
        let Some(off) = gpa.checked_sub(self.gpa) else {
            return false;
        };
        let i = (off >> PAGE_SHIFT) as usize;
        i < self.pages && self.bits[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Guest-physical addresses of the dirty pages, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages)
            .filter(|i| self.bits[i / 64] & (1 << (i % 64)) != 0)
            .map(|i| self.gpa + ((i as u64) << PAGE_SHIFT))
    }

    /// Merge another bitmap of the same region.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_iteration() {
        let mut d = DirtyBitmap::new(0x10_0000, 70, vec![0b101]);
        assert_eq!(d.words().len(), 2);
        assert!(d.is_dirty(0x10_0000) && !d.is_dirty(0x10_1000) && d.is_dirty(0x10_2fff));
        assert!(!d.is_dirty(0xf_f000) && !d.is_dirty(0x10_0000 + 70 * 4096));
        d.merge(&DirtyBitmap::new(0x10_0000, 70, vec![0, 1 << 5]));
        assert_eq!(
            d.iter().collect::<Vec<_>>(),
            vec![0x10_0000, 0x10_2000, 0x10_0000 + 69 * 4096]
        );
        assert_eq!(d.count(), 3);
    }
}
