//! Shared pieces of the runnable examples: a subscriber that prints what
//! it sees, and a small address-space constructor.
//!
//! Guides (repository `docs/guide/`) build on these examples.
//!
//! # Stability
//!
//! Not published; the examples follow the crates' current API.

use std::sync::Arc;

use notifier_core::frame::HeapFrames;
use notifier_core::mm::{Mm, MmConfig};
use notifier_core::notifier::{Again, Hooks, InvalidateRange, MmuNotifierOps};
use parking_lot::Mutex;

/// First PFN of the examples' device memory (not frames of the primary).
pub const IO_BASE: u64 = 0x10_0000;

/// An address space with 1024 frames and 16 pages of device memory.
pub fn new_mm() -> Arc<Mm> {
    let frames = Arc::new(HeapFrames::new(0x1000, 1024));
    let io = Arc::new(HeapFrames::new(IO_BASE, 16));
    Mm::with_config(
        frames,
        MmConfig {
            io_memory: Some(io),
            ..MmConfig::default()
        },
    )
    .expect("1024 frames are enough for the zero page")
}

/// A range subscriber that prints every callback and keeps the lines.
#[derive(Default)]
pub struct PrintingSubscriber {
    lines: Mutex<Vec<String>>,
}

impl PrintingSubscriber {
    /// A new subscriber.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn say(&self, s: String) {
        println!("  secondary saw: {s}");
        self.lines.lock().push(s);
    }

    /// What it saw so far.
    pub fn seen(&self) -> Vec<String> {
        self.lines.lock().clone()
    }
}

impl MmuNotifierOps for PrintingSubscriber {
    fn hooks(&self) -> Hooks {
        Hooks::START_END | Hooks::CLEAR | Hooks::RELEASE
    }
    fn invalidate_range_start(&self, r: &InvalidateRange) -> Result<(), Again> {
        self.say(format!(
            "invalidate_range_start [{:#x}, {:#x}) {}",
            r.start(),
            r.end(),
            r.event().name()
        ));
        Ok(())
    }
    fn invalidate_range_end(&self, r: &InvalidateRange) {
        self.say(format!(
            "invalidate_range_end   [{:#x}, {:#x}) {}",
            r.start(),
            r.end(),
            r.event().name()
        ));
    }
    fn clear(&self, addr: u64) {
        self.say(format!("clear {addr:#x}"));
    }
    fn release(&self) {
        self.say("release".to_string());
    }
}
