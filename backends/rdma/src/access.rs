//! Access rights of a registration and the ODP prefetch advices.

/// Access rights of a memory region (the verbs `IBV_ACCESS_*` flags).
///
/// Local read is always granted, as in verbs: [`Access::normalize`] adds
/// it. Remote write and remote atomic need local write (verbs answers
/// `EINVAL` otherwise; so does [`Access::validate`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Access(u8);

impl Access {
    /// No rights (normalised to [`Access::LOCAL_READ`]).
    pub const NONE: Access = Access(0);
    /// The local CPU/NIC may read through the lkey.
    pub const LOCAL_READ: Access = Access(1 << 0);
    /// The local NIC may write through the lkey (receive buffers, read responses).
    pub const LOCAL_WRITE: Access = Access(1 << 1);
    /// A remote peer may RDMA-read through the rkey.
    pub const REMOTE_READ: Access = Access(1 << 2);
    /// A remote peer may RDMA-write through the rkey.
    pub const REMOTE_WRITE: Access = Access(1 << 3);
    /// A remote peer may run atomics (fetch-add) through the rkey.
    pub const REMOTE_ATOMIC: Access = Access(1 << 4);
    /// Local read and write.
    pub const LOCAL_RW: Access = Access(Self::LOCAL_READ.0 | Self::LOCAL_WRITE.0);
    /// Every right.
    pub const ALL: Access = Access(0x1f);
    /// Any remote right.
    pub const REMOTE: Access =
        Access(Self::REMOTE_READ.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_ATOMIC.0);
    /// Rights that let the NIC write memory.
    pub const ANY_WRITE: Access =
        Access(Self::LOCAL_WRITE.0 | Self::REMOTE_WRITE.0 | Self::REMOTE_ATOMIC.0);

    /// The raw bits.
    #[inline]
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// From raw bits; unknown bits are kept so [`Access::validate`] can reject them.
    #[inline]
    pub const fn from_bits(bits: u8) -> Access {
        Access(bits)
    }
    /// Whether every right of `other` is in `self`.
    #[inline]
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether any right of `other` is in `self`.
    #[inline]
    pub const fn intersects(self, other: Access) -> bool {
        self.0 & other.0 != 0
    }
    /// The union.
    #[inline]
    pub const fn union(self, other: Access) -> Access {
        Access(self.0 | other.0)
    }
    /// With local read added (always granted).
    #[inline]
    pub const fn normalize(self) -> Access {
        Access(self.0 | Self::LOCAL_READ.0)
    }
    /// Whether the combination is one verbs accepts: known bits only, and
    /// remote write or atomic only together with local write.
    pub const fn validate(self) -> bool {
        if self.0 & !Self::ALL.0 != 0 {
            return false;
        }
        !self.intersects(Access(Self::REMOTE_WRITE.0 | Self::REMOTE_ATOMIC.0))
            || self.contains(Self::LOCAL_WRITE)
    }
}

impl core::ops::BitOr for Access {
    type Output = Access;
    #[inline]
    fn bitor(self, rhs: Access) -> Access {
        self.union(rhs)
    }
}

impl core::fmt::Debug for Access {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: [&str; 5] = [
            "LOCAL_READ",
            "LOCAL_WRITE",
            "REMOTE_READ",
            "REMOTE_WRITE",
            "REMOTE_ATOMIC",
        ];
        let mut first = true;
        for (i, n) in NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(n)?;
                first = false;
            }
        }
        if first {
            f.write_str("NONE")?;
        }
        Ok(())
    }
}

/// An ODP prefetch advice (`ibv_advise_mr`, the `IB_UVERBS_ADVISE_MR_ADVICE_*` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    /// Fault the pages in for reading.
    Prefetch,
    /// Fault the pages in for writing (breaks COW); needs a writable region.
    PrefetchWrite,
    /// Map only the pages the primary already has present; never fault.
    PrefetchNoFault,
}

impl Advice {
    /// Every advice, for tests.
    pub const ALL: [Advice; 3] = [
        Advice::Prefetch,
        Advice::PrefetchWrite,
        Advice::PrefetchNoFault,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_rules() {
        assert!(Access::LOCAL_RW.validate());
        assert!(Access::ALL.validate());
        assert!(!(Access::REMOTE_WRITE).validate());
        assert!(!(Access::REMOTE_ATOMIC | Access::LOCAL_READ).validate());
        assert!(!Access::from_bits(0x40).validate());
        assert_eq!(Access::NONE.normalize(), Access::LOCAL_READ);
        assert_eq!(format!("{:?}", Access::LOCAL_RW), "LOCAL_READ|LOCAL_WRITE");
    }
}
