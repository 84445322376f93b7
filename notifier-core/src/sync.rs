//! The private synchronisation facade: `std`/`parking_lot` normally, `loom`
//! under `--cfg loom`, so the protocol code is model-checked as written.

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{
        AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };

    /// A mutex whose `lock` cannot fail (parking_lot has no poisoning).
    pub(crate) type Mutex<T> = parking_lot::Mutex<T>;
    pub(crate) type MutexGuard<'a, T> = parking_lot::MutexGuard<'a, T>;

    /// A condition variable paired with [`Mutex`].
    #[derive(Default)]
    pub(crate) struct Condvar(parking_lot::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(parking_lot::Condvar::new())
        }
        pub(crate) fn wait<'a, T>(&self, mut guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(&mut guard);
            guard
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock()
    }

    pub(crate) fn new_mutex<T>(v: T) -> Mutex<T> {
        parking_lot::Mutex::new(v)
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{
        AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
    };
    pub(crate) use loom::sync::{Mutex, MutexGuard};

    pub(crate) struct Condvar(loom::sync::Condvar);

    impl Condvar {
        pub(crate) fn new() -> Self {
            Self(loom::sync::Condvar::new())
        }
        pub(crate) fn wait<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
            self.0.wait(guard).expect("loom condvar")
        }
        pub(crate) fn notify_all(&self) {
            self.0.notify_all();
        }
    }

    pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().expect("loom mutex")
    }

    pub(crate) fn new_mutex<T>(v: T) -> Mutex<T> {
        loom::sync::Mutex::new(v)
    }
}

pub(crate) use imp::*;

/// Per-thread depth of notifier callbacks currently running on this thread.
/// Unsubscribing from inside a callback must not wait for the invalidation
/// that is calling it (that would deadlock), so the teardown paths read it.
#[cfg(not(loom))]
mod depth {
    use std::cell::Cell;
    std::thread_local!(static DEPTH: Cell<u32> = const { Cell::new(0) });
    pub(crate) fn enter() {
        DEPTH.with(|d| d.set(d.get() + 1));
    }
    pub(crate) fn exit() {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
    pub(crate) fn in_callback() -> bool {
        DEPTH.with(|d| d.get() > 0)
    }
}

#[cfg(loom)]
mod depth {
    use std::cell::Cell;
    loom::thread_local!(static DEPTH: Cell<u32> = Cell::new(0));
    pub(crate) fn enter() {
        DEPTH.with(|d| d.set(d.get() + 1));
    }
    pub(crate) fn exit() {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
    pub(crate) fn in_callback() -> bool {
        DEPTH.with(|d| d.get() > 0)
    }
}

/// RAII marker for "a notifier callback runs on this thread".
pub(crate) struct CallbackScope(());

impl CallbackScope {
    #[inline]
    pub(crate) fn enter() -> Self {
        depth::enter();
        CallbackScope(())
    }
}

impl Drop for CallbackScope {
    #[inline]
    fn drop(&mut self) {
        depth::exit();
    }
}

/// Whether a notifier callback is running on the calling thread.
pub(crate) fn in_callback() -> bool {
    depth::in_callback()
}
