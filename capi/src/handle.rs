//! Tables of live objects behind the C handles.
//!
//! A C handle is a value (`struct { uint64_t id; }`), never a pointer the
//! library dereferences: `id` packs a slot index, the kind of object and
//! the slot's generation. A slot lives as long as the process (a static
//! array), so a null, forged, foreign-kind or destroyed handle is detected
//! by comparing numbers, never by touching freed memory.
//!
//! ```text
//!   id = generation << 32 | kind << 24 | (index + 1)      (0 is never issued)
//!   slot = Mutex<{ gen, obj: Option<Box<T>>, poisoned }>  (gen odd while live)
//! ```
//!
//! # Locking
//! Each slot has its own mutex (`parking_lot`), taken by every call on the
//! handle for the duration of the call and never across a hook call into
//! C. Creating and destroying take it too: a destroy waits for calls in
//! progress on the same handle, and calls after it fail with
//! `NOTIFIER_EBADHANDLE`. A panic while the slot is held poisons it: later
//! calls answer `NOTIFIER_EPANIC`, destroy still frees it.

use parking_lot::{const_mutex, Mutex};

use crate::status::{Failure, Res, NOTIFIER_EBADHANDLE, NOTIFIER_ELIMIT, NOTIFIER_EPANIC};

/// Slots per table: the most live objects of one kind.
pub(crate) const SLOTS: usize = 1024;

/// The kind tag of a handle.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Kind {
    Registry = 0x52,
    Monitor = 0x4d,
}

struct Slot<T> {
    gen: u32,
    obj: Option<Box<T>>,
    poisoned: bool,
}

/// A fixed table of live objects of one kind.
pub(crate) struct Table<T: 'static> {
    kind: Kind,
    slots: [Mutex<Slot<T>>; SLOTS],
}

impl<T: Send + 'static> Table<T> {
    pub(crate) const fn new(kind: Kind) -> Self {
        Self {
            kind,
            slots: [const {
                const_mutex(Slot {
                    gen: 0,
                    obj: None,
                    poisoned: false,
                })
            }; SLOTS],
        }
    }

    fn decode(&self, id: u64) -> Res<(usize, u32)> {
        let idx = (id & 0xff_ffff) as usize;
        let kind = ((id >> 24) & 0xff) as u8;
        let gen = (id >> 32) as u32;
        if idx == 0 || idx > SLOTS || kind != self.kind as u8 || gen & 1 == 0 {
            return Err(bad(self.kind, id));
        }
        Ok((idx - 1, gen))
    }

    /// Store `obj` in a free slot and return its handle id.
    pub(crate) fn insert(&self, obj: T) -> Res<u64> {
        let mut obj = Some(Box::new(obj));
        for (i, m) in self.slots.iter().enumerate() {
            let Some(mut s) = m.try_lock() else { continue };
            if s.obj.is_none() {
                s.gen = s.gen.wrapping_add(1) | 1;
                s.obj = obj.take();
                s.poisoned = false;
                return Ok(u64::from(s.gen) << 32 | (self.kind as u64) << 24 | (i as u64 + 1));
            }
        }
        Err(Failure::new(
            NOTIFIER_ELIMIT,
            format!("{SLOTS} live {:?} handles: destroy one first", self.kind),
        ))
    }

    /// Run `f` on the live object of `id`, holding its slot.
    #[inline]
    pub(crate) fn with<R>(&self, id: u64, f: impl FnOnce(&mut T) -> Res<R>) -> Res<R> {
        let (idx, gen) = self.decode(id)?;
        let mut s = self.slots[idx].lock();
        if s.gen != gen || s.obj.is_none() {
            return Err(bad(self.kind, id));
        }
        if s.poisoned {
            return Err(Failure::new(
                NOTIFIER_EPANIC,
                "an earlier call on this handle panicked; destroy it",
            ));
        }
        // Poisoned unless `f` returns (a panic unwinds past the reset).
        let Slot { obj, poisoned, .. } = &mut *s;
        *poisoned = true;
        let r = f(obj.as_deref_mut().expect("checked above"));
        *poisoned = false;
        r
    }

    /// Take the object of `id` out (its handle dies now); the caller drops
    /// it outside the slot lock.
    pub(crate) fn remove(&self, id: u64, keep: impl FnOnce(&T) -> Res) -> Res<Box<T>> {
        let (idx, gen) = self.decode(id)?;
        let mut s = self.slots[idx].lock();
        if s.gen != gen {
            return Err(bad(self.kind, id));
        }
        let Some(obj) = s.obj.as_deref() else {
            return Err(bad(self.kind, id));
        };
        keep(obj)?;
        s.gen = s.gen.wrapping_add(1) & !1;
        s.poisoned = false;
        Ok(s.obj.take().expect("checked above"))
    }
}

fn bad(kind: Kind, id: u64) -> Failure {
    Failure::new(
        NOTIFIER_EBADHANDLE,
        if id == 0 {
            format!("null {kind:?} handle")
        } else {
            format!(
                "{id:#x} is not a live {kind:?} handle (never issued, destroyed, or another kind)"
            )
        },
    )
}
