//! External addresses and permissions of a secondary MMU.
//!
//! A secondary translates its own address space (an RDMA IOVA, a guest
//! physical address, or plainly the primary's virtual address) to frames.
//! [`ExternalAddress`] makes the toolkit generic over which one.

/// One past the highest external address (the 48-bit space the external
/// page table translates).
pub const EXT_ADDR_LIMIT: u64 = 1 << 48;

/// Whether `[base, base + len)` lies inside the external space (no wrap).
#[inline]
pub const fn ext_span_fits(base: u64, len: u64) -> bool {
    match base.checked_add(len) {
        Some(end) => end <= EXT_ADDR_LIMIT,
        None => false,
    }
}

/// An address in a secondary's own space.
pub trait ExternalAddress: Copy + Eq + core::fmt::Debug + Send + Sync + 'static {
    /// The raw value.
    fn raw(self) -> u64;
    /// From a raw value.
    fn from_raw(raw: u64) -> Self;
}

macro_rules! ext_addr {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);
        impl ExternalAddress for $name {
            #[inline]
            fn raw(self) -> u64 {
                self.0
            }
            #[inline]
            fn from_raw(raw: u64) -> Self {
                Self(raw)
            }
        }
        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }
    };
}

ext_addr!(
    /// An I/O virtual address (RDMA, IOMMU).
    Iova
);
ext_addr!(
    /// A guest-physical address (KVM).
    Gpa
);
ext_addr!(
    /// The primary's own virtual address (a secondary that mirrors 1:1).
    Va
);

/// Permissions of an external entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No access.
    pub const NONE: Perm = Perm(0);
    /// Read.
    pub const READ: Perm = Perm(1);
    /// Read and write.
    pub const READ_WRITE: Perm = Perm(3);

    /// Read-write when `writable`, else read-only.
    #[inline]
    pub const fn from_writable(writable: bool) -> Perm {
        if writable {
            Perm::READ_WRITE
        } else {
            Perm::READ
        }
    }
    /// Whether reads are allowed.
    #[inline]
    pub const fn readable(self) -> bool {
        self.0 & 1 != 0
    }
    /// Whether writes are allowed.
    #[inline]
    pub const fn writable(self) -> bool {
        self.0 & 2 != 0
    }
    /// Whether an access (`write` or read) is allowed.
    #[inline]
    pub const fn allows(self, write: bool) -> bool {
        if write {
            self.writable()
        } else {
            self.readable()
        }
    }
    #[inline]
    pub(crate) const fn bits(self) -> u8 {
        self.0
    }
    #[inline]
    pub(crate) const fn from_bits(b: u8) -> Perm {
        Perm(b & 3)
    }
}

impl core::fmt::Debug for Perm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self.0 & 3 {
            0 => "---",
            1 => "r--",
            2 => "-w-",
            _ => "rw-",
        })
    }
}
