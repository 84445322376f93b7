//! Shared helpers of the mm integration tests: address-space constructors
//! and the recording subscriber that checks the notification discipline.
#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::Arc;

use notifier_core::frame::HeapFrames;
use notifier_core::mm::{is_invalidating_change, Mm, MmConfig, Pte, PteChange};
use notifier_core::notifier::{Again, Event, Hooks, InvalidateRange, MmuNotifier, MmuNotifierOps};
use parking_lot::Mutex;

/// First PFN of device (I/O) memory in the tests.
pub const IO_BASE: u64 = 0x10_0000;
pub const PAGE: u64 = 4096;

/// An address space with 4096 frames and 64 pages of device memory.
pub fn new_mm() -> Arc<Mm> {
    mm_with(false)
}

/// Same, without the special PTE bit (seed 001's linearity rules).
pub fn new_mm_no_special() -> Arc<Mm> {
    mm_with(true)
}

pub fn mm_with(no_pte_special: bool) -> Arc<Mm> {
    let frames = Arc::new(HeapFrames::new(0x1000, 4096));
    let io = Arc::new(HeapFrames::new(IO_BASE, 64));
    Mm::with_config(
        frames,
        MmConfig {
            no_pte_special,
            io_memory: Some(io),
        },
    )
    .unwrap()
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Start(u64, u64, Event),
    End(u64, u64, Event),
    Clear(u64),
    Young(u64, u64),
    Release,
    Pte(PteChange),
}

/// A range subscriber with START | END | CLEAR | AGING | RELEASE that logs
/// everything, plus the PTE observer feeding the same log.
#[derive(Default)]
pub struct Recorder {
    pub log: Mutex<Vec<Ev>>,
    pub young_answer: std::sync::atomic::AtomicBool,
}

impl MmuNotifierOps for Recorder {
    fn hooks(&self) -> Hooks {
        Hooks::START_END | Hooks::CLEAR | Hooks::AGING | Hooks::RELEASE
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        self.log
            .lock()
            .push(Ev::Start(r.start(), r.end(), r.event()));
        Ok(())
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        self.log.lock().push(Ev::End(r.start(), r.end(), r.event()));
    }
    fn clear(&self, addr: u64) {
        self.log.lock().push(Ev::Clear(addr));
    }
    fn clear_flush_young(&self, s: u64, e: u64) -> bool {
        self.log.lock().push(Ev::Young(s, e));
        self.young_answer.load(std::sync::atomic::Ordering::Relaxed)
    }
    fn clear_young(&self, s: u64, e: u64) -> bool {
        self.clear_flush_young(s, e)
    }
    fn release(&self) {
        self.log.lock().push(Ev::Release);
    }
}

impl Recorder {
    pub fn take(&self) -> Vec<Ev> {
        core::mem::take(&mut *self.log.lock())
    }
    pub fn events(&self) -> Vec<Ev> {
        self.log.lock().clone()
    }
    /// The bracket events (start) seen, in order.
    pub fn starts(&self) -> Vec<(u64, u64, Event)> {
        self.log
            .lock()
            .iter()
            .filter_map(|e| match e {
                Ev::Start(s, t, ev) => Some((*s, *t, *ev)),
                _ => None,
            })
            .collect()
    }
    pub fn clears(&self) -> Vec<u64> {
        self.log
            .lock()
            .iter()
            .filter_map(|e| if let Ev::Clear(a) = e { Some(*a) } else { None })
            .collect()
    }
}

/// Register a recorder on `mm` and observe its PTE stores.
pub fn attach(mm: &Arc<Mm>) -> (Arc<Recorder>, MmuNotifier) {
    let rec = Arc::new(Recorder::default());
    let h = mm.notifiers().register(rec.clone()).unwrap();
    let r2 = rec.clone();
    mm.inject()
        .set_pte_observer(Some(Arc::new(move |c: PteChange| {
            r2.log.lock().push(Ev::Pte(c))
        })));
    (rec, h)
}

/// Check the discipline over a log: every invalidating PTE change lies in an
/// open bracket covering its address; every present PTE that becomes
/// non-present was announced by `clear` inside the bracket first; brackets
/// pair. Returns the number of invalidating changes checked.
pub fn check_discipline(log: &[Ev]) -> Result<usize, String> {
    let mut open: Vec<(u64, u64)> = Vec::new();
    let mut cleared: HashSet<u64> = HashSet::new();
    let mut checked = 0;
    for (i, e) in log.iter().enumerate() {
        match e {
            Ev::Release => return Ok(checked),
            Ev::Start(s, t, _) => open.push((*s, *t)),
            Ev::End(s, t, _) => {
                let k = open
                    .iter()
                    .position(|o| *o == (*s, *t))
                    .ok_or(format!("#{i}: end without start {e:?}"))?;
                open.remove(k);
                if open.is_empty() {
                    cleared.clear();
                }
            }
            Ev::Clear(a) => {
                if !open.iter().any(|(s, t)| s <= a && a < t) {
                    return Err(format!("#{i}: clear({a:#x}) outside any bracket"));
                }
                cleared.insert(*a);
            }
            Ev::Young(..) => {}
            Ev::Pte(c) => {
                if !is_invalidating_change(c.old, c.new) {
                    continue;
                }
                checked += 1;
                if !open.iter().any(|(s, t)| *s <= c.addr && c.addr < *t) {
                    return Err(format!(
                        "#{i}: PTE change at {:#x} without a covering bracket: {c:?}",
                        c.addr
                    ));
                }
                let was_present = Pte::decode(c.old).present().is_some();
                let now_present = Pte::decode(c.new).present().is_some();
                if was_present && !now_present && !cleared.remove(&c.addr) {
                    return Err(format!(
                        "#{i}: present PTE at {:#x} cleared without a preceding clear()",
                        c.addr
                    ));
                }
            }
        }
    }
    if !open.is_empty() {
        return Err(format!("brackets left open: {open:?}"));
    }
    Ok(checked)
}
