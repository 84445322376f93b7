//! [`TestPrimary`]: a small software primary for tests, benches and the
//! example: a page table from primary address to memfd frame, whose every
//! change is bracketed by `invalidate_range_start`/`end`, freeing frames
//! only after the end. It models just enough of a primary address space
//! (anonymous and special mappings, remap, migrate, COW, DONTNEED, munmap,
//! soft-dirty) to drive the mirror; `notifier_core`'s full primary replaces
//! it in real use: the mirror only sees the [`Primary`] trait.
//!
//! Its operations panic on misuse (it is a test fixture, not an API).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::MemfdFrames;
use notifier_core::frame::{FrameStore, Pfn};
use notifier_core::notifier::{Event, InvalidateRange, NotifierSubscriptions};
use notifier_core::primary::{Primary, PrimaryFault, Translation};
use notifier_core::{PageRange, PAGE_SIZE};
use parking_lot::Mutex;

/// A special mapping's fault callback: returns the frame for an address.
pub type SpecialFault = Arc<dyn Fn(u64) -> Result<Translation, PrimaryFault> + Send + Sync>;

#[derive(Clone)]
enum Kind {
    Anon,
    Special(SpecialFault),
}

#[derive(Clone, Copy, Debug)]
struct Pte {
    pfn: Pfn,
    writable: bool,
    /// A write must copy the frame first (COW).
    cow: bool,
    /// The primary allocated the frame and frees it on unmap.
    owned: bool,
}

/// The test primary.
pub struct TestPrimary {
    subs: Arc<NotifierSubscriptions>,
    frames: Arc<MemfdFrames>,
    pt: Mutex<BTreeMap<u64, Pte>>,
    vmas: Mutex<Vec<(u64, u64, Kind)>>,
}

impl TestPrimary {
    /// An empty address space over `frames`.
    pub fn new(frames: Arc<MemfdFrames>) -> Arc<Self> {
        Arc::new(Self {
            subs: NotifierSubscriptions::new(),
            frames,
            pt: Mutex::new(BTreeMap::new()),
            vmas: Mutex::new(Vec::new()),
        })
    }

    /// The memfd frames.
    pub fn memfd(&self) -> &Arc<MemfdFrames> {
        &self.frames
    }

    /// Map anonymous memory (zero-filled on first touch).
    pub fn mmap_anon(&self, addr: u64, len: u64) {
        self.vmas.lock().push((addr, addr + len, Kind::Anon));
    }

    /// Map a special mapping whose faults `f` serves (seed 002).
    pub fn mmap_special(&self, addr: u64, len: u64, f: SpecialFault) {
        self.vmas.lock().push((addr, addr + len, Kind::Special(f)));
    }

    fn kind(&self, addr: u64) -> Option<Kind> {
        self.vmas
            .lock()
            .iter()
            .rev()
            .find(|(s, e, _)| *s <= addr && addr < *e)
            .map(|(_, _, k)| k.clone())
    }

    /// Change the PTEs of `[addr, addr + len)` with `f` inside one bracket;
    /// frames `f` returns are freed after the end.
    fn change(
        &self,
        addr: u64,
        len: u64,
        event: Event,
        f: impl FnOnce(&mut BTreeMap<u64, Pte>, &dyn Fn(u64)) -> Vec<Pfn>,
    ) {
        let range = InvalidateRange::new(PageRange::new(addr, len).unwrap(), event);
        let inv = self.subs.invalidate_range_start(&range).unwrap();
        let freed = {
            let mut pt = self.pt.lock();
            f(&mut pt, &|a| inv.clear(a))
        };
        inv.invalidate_secondary_tlbs(addr, addr + len);
        inv.end();
        for p in freed {
            self.frames.free(p);
        }
    }

    /// `munmap`: the range is gone; faults there fail until mapped again.
    pub fn munmap(&self, addr: u64, len: u64) {
        self.change(addr, len, Event::Unmap, |pt, clear| {
            zap(pt, addr, len, clear)
        });
        let end = addr + len;
        let mut vmas = self.vmas.lock();
        let old = std::mem::take(&mut *vmas);
        for (s, e, k) in old {
            if s < addr {
                vmas.push((s, e.min(addr), k.clone()));
            }
            if e > end {
                vmas.push((s.max(end), e, k));
            }
        }
    }

    /// `madvise(MADV_DONTNEED)`: anonymous pages read back as zero.
    pub fn dontneed(&self, addr: u64, len: u64) {
        self.change(addr, len, Event::Clear, |pt, clear| {
            zap(pt, addr, len, clear)
        });
    }

    /// Point the page at `addr` to `pfn` (a `remap_file_pages` to another
    /// file page / a hot remap). The old frame, if the primary owned it, is
    /// freed after the end.
    pub fn remap(&self, addr: u64, pfn: Pfn, writable: bool) {
        self.change(addr, PAGE_SIZE, Event::Clear, |pt, clear| {
            if pt.contains_key(&addr) {
                clear(addr);
            }
            let old = pt.insert(
                addr,
                Pte {
                    pfn,
                    writable,
                    cow: false,
                    owned: false,
                },
            );
            freed(old)
        });
    }

    /// Migrate the page at `addr` to a new frame with the same content.
    pub fn migrate(&self, addr: u64) -> Pfn {
        let new = self.frames.alloc().unwrap();
        self.change(addr, PAGE_SIZE, Event::Migrate, |pt, clear| {
            let old = pt.get_mut(&addr).expect("migrate a present page");
            clear(addr);
            self.frames.copy(old.pfn, new).unwrap();
            let o = *old;
            *old = Pte {
                pfn: new,
                owned: true,
                ..o
            };
            if o.owned {
                vec![o.pfn]
            } else {
                vec![]
            }
        });
        new
    }

    /// Share `pfn` read-only at `addr` copy-on-write (as after fork).
    pub fn map_cow(&self, addr: u64, pfn: Pfn) {
        self.change(addr, PAGE_SIZE, Event::ProtectionPage, |pt, clear| {
            if pt.contains_key(&addr) {
                clear(addr);
            }
            let old = pt.insert(
                addr,
                Pte {
                    pfn,
                    writable: false,
                    cow: true,
                    owned: false,
                },
            );
            freed(old)
        });
    }

    /// Soft-dirty: write-protect the present pages of the range.
    pub fn clear_soft_dirty(&self, addr: u64, len: u64) {
        self.change(addr, len, Event::SoftDirty, |pt, _| {
            for (_, p) in pt.range_mut(addr..addr + len) {
                p.writable = false;
            }
            vec![]
        });
    }

    /// Write through the primary (faulting for write).
    pub fn write(&self, addr: u64, data: &[u8]) {
        let t = self.fault_page(addr & !(PAGE_SIZE - 1), true).unwrap();
        self.frames
            .write(t.pfn, (addr % PAGE_SIZE) as usize, data)
            .unwrap();
    }

    /// Read the primary's current bytes (faulting for read).
    pub fn read_u32(&self, addr: u64) -> u32 {
        let t = self.fault_page(addr & !(PAGE_SIZE - 1), false).unwrap();
        let mut b = [0u8; 4];
        self.frames
            .read(t.pfn, (addr % PAGE_SIZE) as usize, &mut b)
            .unwrap();
        u32::from_le_bytes(b)
    }
}

/// The frame to free after replacing `old`.
fn freed(old: Option<Pte>) -> Vec<Pfn> {
    let Some(o) = old else { return vec![] };
    if o.owned {
        vec![o.pfn]
    } else {
        vec![]
    }
}

fn zap(pt: &mut BTreeMap<u64, Pte>, addr: u64, len: u64, clear: &dyn Fn(u64)) -> Vec<Pfn> {
    let keys: Vec<u64> = pt.range(addr..addr + len).map(|(k, _)| *k).collect();
    keys.into_iter()
        .filter_map(|k| {
            clear(k);
            pt.remove(&k).filter(|p| p.owned).map(|p| p.pfn)
        })
        .collect()
}

impl Primary for TestPrimary {
    fn notifiers(&self) -> &Arc<NotifierSubscriptions> {
        &self.subs
    }

    fn frames(&self) -> &dyn FrameStore {
        &*self.frames
    }

    fn fault_page(&self, addr: u64, write: bool) -> Result<Translation, PrimaryFault> {
        let kind = self.kind(addr).ok_or(PrimaryFault::NoMapping(addr))?;
        {
            let mut pt = self.pt.lock();
            match pt.get_mut(&addr) {
                Some(p) if !write || p.writable => {
                    return Ok(Translation {
                        pfn: p.pfn,
                        writable: p.writable,
                    })
                }
                Some(p) if !p.cow => {
                    // Soft-dirty write fault: an upgrade, no invalidation.
                    p.writable = true;
                    return Ok(Translation {
                        pfn: p.pfn,
                        writable: true,
                    });
                }
                Some(_) => {}
                None => {
                    let t = match kind {
                        Kind::Anon => {
                            let pfn = self.frames.alloc().map_err(|_| PrimaryFault::OutOfMemory)?;
                            pt.insert(
                                addr,
                                Pte {
                                    pfn,
                                    writable: true,
                                    cow: false,
                                    owned: true,
                                },
                            );
                            Translation {
                                pfn,
                                writable: true,
                            }
                        }
                        Kind::Special(f) => {
                            let t = f(addr)?;
                            pt.insert(
                                addr,
                                Pte {
                                    pfn: t.pfn,
                                    writable: t.writable,
                                    cow: false,
                                    owned: false,
                                },
                            );
                            t
                        }
                    };
                    return Ok(t);
                }
            }
        }
        // COW break: copy into a new frame, inside a bracket.
        let new = self.frames.alloc().map_err(|_| PrimaryFault::OutOfMemory)?;
        self.change(addr, PAGE_SIZE, Event::Clear, |pt, clear| {
            let p = pt.get_mut(&addr).expect("present");
            clear(addr);
            self.frames.copy(p.pfn, new).unwrap();
            let o = *p;
            *p = Pte {
                pfn: new,
                writable: true,
                cow: false,
                owned: true,
            };
            if o.owned {
                vec![o.pfn]
            } else {
                vec![]
            }
        });
        Ok(Translation {
            pfn: new,
            writable: true,
        })
    }

    fn lookup_page(&self, addr: u64) -> Option<Translation> {
        self.pt.lock().get(&addr).map(|p| Translation {
            pfn: p.pfn,
            writable: p.writable,
        })
    }
}
