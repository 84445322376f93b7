//! A page-table entry packed in a `u64`.
//!
//! | bits      | none | present                 | file (nonlinear) | swap            |
//! |-----------|------|-------------------------|------------------|-----------------|
//! | 0         | 0    | 1 (`PRESENT`)           | 0                | 0               |
//! | 1..=2     | 0    | `WRITE`, `DIRTY`        | type = 1         | type = 2        |
//! | 3..=4     | 0    | `YOUNG`, `SPECIAL`      | pgoff bits 0..   | slot bits 0..   |
//! | 12..=63   | 0    | pfn                     | (pgoff << 3)     | (slot << 3)     |
//!
//! The all-zero word is the empty entry, so a freshly allocated leaf is all
//! `none`. A file PTE keeps the page offset of a nonlinear mapping
//! (seed 004's `pgoff_to_pte`); a swap PTE keeps the slot of a reclaimed
//! anonymous page.

use crate::frame::Pfn;

const PRESENT: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const DIRTY: u64 = 1 << 2;
const YOUNG: u64 = 1 << 3;
const SPECIAL: u64 = 1 << 4;
const PFN_SHIFT: u32 = 12;
const TYPE_SHIFT: u32 = 1;
const TYPE_MASK: u64 = 0b11 << TYPE_SHIFT;
const TYPE_FILE: u64 = 1 << TYPE_SHIFT;
const TYPE_SWAP: u64 = 2 << TYPE_SHIFT;
const PAYLOAD_SHIFT: u32 = 3;

/// How many bits of page offset a file PTE holds (the kernel's
/// `PTE_FILE_MAX_BITS`): `remap_file_pages` rejects offsets at or beyond
/// `1 << PTE_FILE_MAX_BITS`.
pub const PTE_FILE_MAX_BITS: u32 = 64 - PAYLOAD_SHIFT;

/// Largest PFN a present PTE can hold.
pub const PTE_PFN_MAX: u64 = (1 << (64 - PFN_SHIFT)) - 1;

/// A decoded page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pte {
    /// Nothing mapped (`pte_none`).
    None,
    /// A present translation.
    Present(PresentPte),
    /// A nonlinear file PTE: fault in page `pgoff` of the VMA's file.
    File {
        /// The page offset in the file.
        pgoff: u64,
    },
    /// A reclaimed anonymous page, held in swap slot `slot`.
    Swap {
        /// The swap slot.
        slot: u64,
    },
}

/// The fields of a present PTE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PresentPte {
    /// The frame (or raw PFN).
    pub pfn: Pfn,
    /// Writes allowed.
    pub write: bool,
    /// Written since the bit was last cleared.
    pub dirty: bool,
    /// Accessed since the bit was last cleared.
    pub young: bool,
    /// `pte_special`: no struct page is to be derived from the PFN
    /// (raw PFNs, the zero page, seed 000's page-array mappings).
    pub special: bool,
}

impl Pte {
    /// Decode a raw word.
    #[inline]
    pub const fn decode(raw: u64) -> Pte {
        if raw == 0 {
            Pte::None
        } else if raw & PRESENT != 0 {
            Pte::Present(PresentPte {
                pfn: Pfn(raw >> PFN_SHIFT),
                write: raw & WRITE != 0,
                dirty: raw & DIRTY != 0,
                young: raw & YOUNG != 0,
                special: raw & SPECIAL != 0,
            })
        } else if raw & TYPE_MASK == TYPE_FILE {
            Pte::File {
                pgoff: raw >> PAYLOAD_SHIFT,
            }
        } else {
            Pte::Swap {
                slot: raw >> PAYLOAD_SHIFT,
            }
        }
    }

    /// Encode to a raw word.
    #[inline]
    pub const fn encode(self) -> u64 {
        match self {
            Pte::None => 0,
            Pte::Present(p) => p.encode(),
            Pte::File { pgoff } => (pgoff << PAYLOAD_SHIFT) | TYPE_FILE,
            Pte::Swap { slot } => (slot << PAYLOAD_SHIFT) | TYPE_SWAP,
        }
    }

    /// The present fields, if present.
    #[inline]
    pub const fn present(self) -> Option<PresentPte> {
        match self {
            Pte::Present(p) => Some(p),
            _ => None,
        }
    }

    /// Whether this is the empty entry.
    #[inline]
    pub const fn is_none(self) -> bool {
        matches!(self, Pte::None)
    }
}

impl PresentPte {
    /// A present, young PTE for `pfn`.
    #[inline]
    pub const fn new(pfn: Pfn, write: bool, special: bool) -> Self {
        Self {
            pfn,
            write,
            dirty: write,
            young: true,
            special,
        }
    }

    /// Encode to a raw word.
    #[inline]
    pub const fn encode(self) -> u64 {
        (self.pfn.0 << PFN_SHIFT)
            | PRESENT
            | if self.write { WRITE } else { 0 }
            | if self.dirty { DIRTY } else { 0 }
            | if self.young { YOUNG } else { 0 }
            | if self.special { SPECIAL } else { 0 }
    }
}

/// Raw bit masks for in-place updates of a present PTE word (`fetch_or` /
/// `fetch_and`): only the accessed and dirty bits are ever changed in place.
pub(crate) mod bits {
    pub(crate) const WRITE: u64 = super::WRITE;
    pub(crate) const DIRTY: u64 = super::DIRTY;
    pub(crate) const YOUNG: u64 = super::YOUNG;
    pub(crate) const PRESENT: u64 = super::PRESENT;
}

/// Whether the change `old -> new` takes something away from a translation
/// a secondary may hold: the frame changes, the entry stops being present,
/// or write permission is removed. Such changes must be bracketed by an
/// invalidation. Setting accessed/dirty bits or upgrading permissions is not.
pub fn is_invalidating_change(old: u64, new: u64) -> bool {
    match (Pte::decode(old).present(), Pte::decode(new).present()) {
        (Some(o), Some(n)) => o.pfn != n.pfn || (o.write && !n.write),
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cases = [
            Pte::None,
            Pte::Present(PresentPte {
                pfn: Pfn(0x12345),
                write: true,
                dirty: false,
                young: true,
                special: true,
            }),
            Pte::Present(PresentPte::new(Pfn(PTE_PFN_MAX), false, false)),
            Pte::File { pgoff: 0 },
            Pte::File {
                pgoff: (1 << PTE_FILE_MAX_BITS) - 1,
            },
            Pte::Swap { slot: 7 },
        ];
        for c in cases {
            assert_eq!(Pte::decode(c.encode()), c);
        }
        assert_ne!(
            Pte::File { pgoff: 0 }.encode(),
            0,
            "file pte for pgoff 0 is not none"
        );
    }

    #[test]
    fn invalidating_changes() {
        let rw = PresentPte::new(Pfn(5), true, false).encode();
        let ro = PresentPte::new(Pfn(5), false, false).encode();
        assert!(is_invalidating_change(rw, ro));
        assert!(!is_invalidating_change(ro, rw));
        assert!(is_invalidating_change(ro, 0));
        assert!(!is_invalidating_change(0, ro));
        assert!(is_invalidating_change(
            ro,
            PresentPte::new(Pfn(6), false, false).encode()
        ));
    }
}
