//! Random operation sequences against a plain reference model (a map from
//! page to contents, permissions and residency). After every operation
//! every readable byte is compared, and the whole run's notifier log must
//! satisfy the bracket/clear discipline.

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use notifier_core::mm::{Advice, MmError, MmapRequest, Prot};
use proptest::prelude::*;

const BASE: u64 = 0x10_0000_0000;
const NPAGES: u64 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Res {
    /// Never written (or dropped): reads zero.
    Untouched,
    /// In a frame; `clean` after MADV_FREE until the next write.
    Resident { clean: bool },
    /// Reclaimed to swap.
    Swapped,
}

#[derive(Clone, Debug)]
struct MPage {
    read: bool,
    write: bool,
    shared: bool,
    data: HashMap<usize, u64>,
    res: Res,
}

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        n: u64,
        prot: u8,
        shared: bool,
    },
    Unmap {
        page: u64,
        n: u64,
    },
    Protect {
        page: u64,
        n: u64,
        prot: u8,
    },
    Write {
        page: u64,
        word: usize,
        val: u64,
    },
    Read {
        page: u64,
        word: usize,
    },
    DontNeed {
        page: u64,
        n: u64,
    },
    Free {
        page: u64,
        n: u64,
    },
    Reclaim {
        page: u64,
        n: u64,
    },
    Migrate {
        page: u64,
        n: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let pg = 0..NPAGES;
    let n = 1..6u64;
    prop_oneof![
        2 => (pg.clone(), n.clone(), 0..3u8, any::<bool>()).prop_map(|(page, n, prot, shared)| Op::Map { page, n, prot, shared }),
        1 => (pg.clone(), n.clone()).prop_map(|(page, n)| Op::Unmap { page, n }),
        1 => (pg.clone(), n.clone(), 0..3u8).prop_map(|(page, n, prot)| Op::Protect { page, n, prot }),
        4 => (pg.clone(), 0..512usize, any::<u64>()).prop_map(|(page, word, val)| Op::Write { page, word, val }),
        1 => (pg.clone(), 0..512usize).prop_map(|(page, word)| Op::Read { page, word }),
        1 => (pg.clone(), n.clone()).prop_map(|(page, n)| Op::DontNeed { page, n }),
        1 => (pg.clone(), n.clone()).prop_map(|(page, n)| Op::Free { page, n }),
        1 => (pg.clone(), n.clone()).prop_map(|(page, n)| Op::Reclaim { page, n }),
        1 => (pg, n).prop_map(|(page, n)| Op::Migrate { page, n }),
    ]
}

fn prot_of(p: u8) -> Prot {
    [Prot::NONE, Prot::READ, Prot::RW][p as usize]
}

fn clip(page: u64, n: u64) -> (u64, u64) {
    (page, n.min(NPAGES - page))
}

fn addr(page: u64) -> u64 {
    BASE + page * PAGE
}

/// The model's read of a page: swapped pages come back dirty.
fn model_touch_read(p: &mut MPage) {
    if !p.shared && p.res == Res::Swapped {
        p.res = Res::Resident { clean: false };
    }
}

fn first_hole(m: &BTreeMap<u64, MPage>, page: u64, n: u64) -> Option<u64> {
    (page..page + n).find(|p| !m.contains_key(p))
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mm = new_mm();
    let (rec, _h) = attach(&mm);
    let mut m: BTreeMap<u64, MPage> = BTreeMap::new();
    for (step, o) in ops.iter().enumerate() {
        match *o {
            Op::Map {
                page,
                n,
                prot,
                shared,
            } => {
                let (page, n) = clip(page, n);
                let mut req = MmapRequest::anon(n * PAGE, prot_of(prot)).at(addr(page));
                if shared {
                    req = req.shared();
                }
                prop_assert_eq!(mm.mmap(&req), Ok(addr(page)));
                let pr = prot_of(prot);
                for p in page..page + n {
                    m.insert(
                        p,
                        MPage {
                            read: pr.read,
                            write: pr.write,
                            shared,
                            data: HashMap::new(),
                            res: Res::Untouched,
                        },
                    );
                }
            }
            Op::Unmap { page, n } => {
                let (page, n) = clip(page, n);
                prop_assert_eq!(mm.munmap(addr(page), n * PAGE), Ok(()));
                for p in page..page + n {
                    m.remove(&p);
                }
            }
            Op::Protect { page, n, prot } => {
                let (page, n) = clip(page, n);
                let r = mm.mprotect(addr(page), n * PAGE, prot_of(prot));
                match first_hole(&m, page, n) {
                    Some(h) => prop_assert_eq!(r, Err(MmError::NoVma { addr: addr(h) })),
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        let pr = prot_of(prot);
                        for p in page..page + n {
                            let mp = m.get_mut(&p).unwrap();
                            mp.read = pr.read;
                            mp.write = pr.write;
                        }
                    }
                }
            }
            Op::Write { page, word, val } => {
                let a = addr(page) + word as u64 * 8;
                let r = mm.write_u64(a, val);
                match m.get_mut(&page) {
                    None => prop_assert_eq!(r, Err(MmError::NoVma { addr: addr(page) })),
                    Some(p) if !p.write => {
                        prop_assert_eq!(r, Err(MmError::Permission { addr: addr(page) }))
                    }
                    Some(p) => {
                        prop_assert_eq!(r, Ok(()));
                        p.data.insert(word, val);
                        if !p.shared {
                            p.res = Res::Resident { clean: false };
                        }
                    }
                }
            }
            Op::Read { page, word } => {
                let r = mm.read_u64(addr(page) + word as u64 * 8);
                match m.get_mut(&page) {
                    None => prop_assert_eq!(r, Err(MmError::NoVma { addr: addr(page) })),
                    Some(p) if !p.read => {
                        prop_assert_eq!(r, Err(MmError::Permission { addr: addr(page) }))
                    }
                    Some(p) => {
                        model_touch_read(p);
                        prop_assert_eq!(r, Ok(p.data.get(&word).copied().unwrap_or(0)));
                    }
                }
            }
            Op::DontNeed { page, n } => {
                let (page, n) = clip(page, n);
                let r = mm.madvise(addr(page), n * PAGE, Advice::DontNeed);
                match first_hole(&m, page, n) {
                    Some(h) => prop_assert_eq!(r, Err(MmError::NoVma { addr: addr(h) })),
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        for p in page..page + n {
                            let mp = m.get_mut(&p).unwrap();
                            if !mp.shared {
                                mp.data.clear();
                                mp.res = Res::Untouched;
                            }
                        }
                    }
                }
            }
            Op::Free { page, n } => {
                let (page, n) = clip(page, n);
                let r = mm.madvise(addr(page), n * PAGE, Advice::Free);
                let bad = (page..page + n).find(|p| m.get(p).is_none_or(|x| x.shared));
                match bad {
                    Some(b) if !m.contains_key(&b) => {
                        prop_assert_eq!(r, Err(MmError::NoVma { addr: addr(b) }))
                    }
                    Some(_) => {
                        prop_assert!(matches!(r, Err(MmError::WrongVmaKind { .. })), "{r:?}")
                    }
                    None => {
                        prop_assert_eq!(r, Ok(()));
                        for p in page..page + n {
                            let mp = m.get_mut(&p).unwrap();
                            if let Res::Resident { .. } = mp.res {
                                mp.res = Res::Resident { clean: true };
                            }
                        }
                    }
                }
            }
            Op::Reclaim { page, n } => {
                let (page, n) = clip(page, n);
                prop_assert!(mm.try_to_unmap(addr(page), n * PAGE).is_ok());
                for p in page..page + n {
                    if let Some(mp) = m.get_mut(&p) {
                        if mp.shared {
                            continue;
                        }
                        match mp.res {
                            Res::Resident { clean: true } => {
                                mp.data.clear();
                                mp.res = Res::Untouched;
                            }
                            Res::Resident { clean: false } => mp.res = Res::Swapped,
                            _ => {}
                        }
                    }
                }
            }
            Op::Migrate { page, n } => {
                let (page, n) = clip(page, n);
                prop_assert!(mm.migrate(addr(page), n * PAGE).is_ok());
            }
        }
        // Compare every readable byte.
        let mut buf = vec![0u8; PAGE as usize];
        for (p, mp) in m.iter_mut().filter(|(_, x)| x.read) {
            prop_assert_eq!(mm.read(addr(*p), &mut buf), Ok(()));
            model_touch_read(mp);
            for w in 0..512usize {
                let got = u64::from_le_bytes(buf[w * 8..w * 8 + 8].try_into().unwrap());
                let want = mp.data.get(&w).copied().unwrap_or(0);
                prop_assert_eq!(got, want, "step {} {:?}: page {} word {}", step, o, p, w);
            }
        }
    }
    check_discipline(&rec.events()).map_err(TestCaseError::fail)?;
    mm.munmap(BASE, NPAGES * PAGE).unwrap();
    prop_assert_eq!(mm.tracked_pages(), 0, "references balance");
    prop_assert_eq!(mm.swap_slots(), 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_the_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}
