//! Addresses, page constants and the one range convention of the crate.
//!
//! Every range is **half-open and page aligned**: `[start, end)` with
//! `start < end`, both multiples of [`PAGE_SIZE`], and `start + len` never
//! wraps. [`PageRange`] is the checked form; anything that takes a range
//! from a user builds one and so returns [`RangeError`] on bad input.

/// log2 of the page size.
pub const PAGE_SHIFT: u32 = 12;
/// The page size: 4 KiB.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset bits inside a page.
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;

/// Whether `addr` is a multiple of [`PAGE_SIZE`].
#[inline]
pub const fn page_aligned(addr: u64) -> bool {
    addr & PAGE_MASK == 0
}

/// A bad range argument.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range is empty.
    #[error("empty range")]
    Empty,
    /// The start or the length is not a multiple of the page size.
    #[error("range {start:#x}+{len:#x} is not page aligned")]
    Misaligned {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
    /// `start + len` overflows the address space.
    #[error("range {start:#x}+{len:#x} wraps around the address space")]
    Wraps {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
    },
}

/// A checked, non-empty, page-aligned, half-open range `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    start: u64,
    end: u64,
}

impl PageRange {
    /// `[start, start + len)`, checked.
    ///
    /// ```
    /// use notifier_core::addr::{PageRange, RangeError};
    /// assert!(PageRange::new(0x1000, 0x2000).is_ok());
    /// assert_eq!(PageRange::new(0x1000, 0), Err(RangeError::Empty));
    /// assert!(matches!(PageRange::new(u64::MAX & !0xfff, 0x2000), Err(RangeError::Wraps { .. })));
    /// ```
    pub const fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if !page_aligned(start) || !page_aligned(len) {
            return Err(RangeError::Misaligned { start, len });
        }
        match start.checked_add(len) {
            Some(end) => Ok(Self { start, end }),
            None => Err(RangeError::Wraps { start, len }),
        }
    }

    /// `[start, end)`, checked.
    pub const fn from_bounds(start: u64, end: u64) -> Result<Self, RangeError> {
        if end <= start {
            return Err(RangeError::Empty);
        }
        Self::new(start, end - start)
    }

    /// First byte.
    #[inline]
    pub const fn start(&self) -> u64 {
        self.start
    }
    /// One past the last byte.
    #[inline]
    pub const fn end(&self) -> u64 {
        self.end
    }
    /// Length in bytes.
    #[inline]
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Never true: a `PageRange` is non-empty by construction.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        false
    }
    /// Number of pages.
    #[inline]
    pub const fn pages(&self) -> u64 {
        self.len() >> PAGE_SHIFT
    }
    /// Whether the two ranges share a byte.
    #[inline]
    pub const fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
    /// Whether `addr` lies inside.
    #[inline]
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
    /// The page addresses, in order.
    pub fn iter_pages(&self) -> impl Iterator<Item = u64> {
        (self.start..self.end).step_by(PAGE_SIZE as usize)
    }
}

impl core::fmt::Debug for PageRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.start, self.end)
    }
}
