//! The Rust side of the C ABI: status codes, caught panics, bad and
//! foreign handles, and the registry/monitor round trip through the
//! `extern "C"` functions exactly as C calls them.
//!
//! Tests that need userfaultfd skip with a visible `SKIP:` line without
//! it, and fail instead under `NOTIFIER_REQUIRE_UFFD=1`.

use core::ffi::c_void;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};

use notifier::*;

fn last_error() -> String {
    let mut buf = [0u8; 1024];
    // SAFETY: a valid buffer of its length.
    let n = unsafe { notifier_last_error(buf.as_mut_ptr().cast(), buf.len()) };
    String::from_utf8_lossy(&buf[..n.min(buf.len() - 1)]).into_owned()
}

fn strerror(s: notifier_status) -> String {
    // SAFETY: notifier_strerror returns a static C string.
    unsafe { CStr::from_ptr(notifier_strerror(s as i32)) }
        .to_string_lossy()
        .into_owned()
}

fn monitor() -> Option<notifier_monitor> {
    let mut m = notifier_monitor { id: 0 };
    // SAFETY: a valid out pointer.
    let st = unsafe { notifier_monitor_create(0, &mut m) };
    if st == NOTIFIER_OK {
        return Some(m);
    }
    let msg = last_error();
    assert_eq!(st, NOTIFIER_UFFD_UNAVAILABLE, "{msg}");
    assert!(msg.contains("fallback"), "no fallback named: {msg}");
    if notifier_uffd::uffd_required() {
        panic!("userfaultfd required but unavailable: {msg}");
    }
    eprintln!("SKIP: userfaultfd unavailable: {msg}");
    None
}

struct Map(*mut c_void, usize);

impl Map {
    fn new(len: usize) -> Map {
        // SAFETY: an anonymous private mapping, checked.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Map(p, len)
    }
    fn unmap(self) {
        // SAFETY: our own mapping, unmapped once.
        assert_eq!(unsafe { libc::munmap(self.0, self.1) }, 0);
        core::mem::forget(self);
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

#[test]
fn every_code_has_a_description() {
    for s in [
        NOTIFIER_OK,
        NOTIFIER_ENULL,
        NOTIFIER_EBADHANDLE,
        NOTIFIER_EPANIC,
        NOTIFIER_ENOTSUP,
        NOTIFIER_REG_STALE_HANDLE,
        NOTIFIER_PROVIDER_NO_DEVICE,
        NOTIFIER_DMA_INVALIDATED,
        NOTIFIER_UFFD_UNAVAILABLE,
        NOTIFIER_UFFD_ALREADY_RUNNING,
    ] {
        assert_ne!(strerror(s), "unknown status code", "{s:?}");
    }
    assert_eq!(strerror_code(12345), "unknown status code");
}

fn strerror_code(c: i32) -> String {
    // SAFETY: notifier_strerror returns a static C string.
    unsafe { CStr::from_ptr(notifier_strerror(c)) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn bad_handles_are_errors_never_crashes() {
    let null_reg = notifier_registry { id: 0 };
    let forged = notifier_registry {
        id: 0xdead_beef_1234_5678,
    };
    let mut mr = notifier_mr::default();
    let buf = [0u8; 64];
    for r in [null_reg, forged] {
        // SAFETY: valid pointers; the handle is what is under test.
        let st = unsafe { notifier_registry_get(r, buf.as_ptr().cast(), 64, 0, &mut mr) };
        assert_eq!(st, NOTIFIER_EBADHANDLE);
        assert!(last_error().contains("handle"), "{}", last_error());
        assert_eq!(notifier_registry_destroy(r), NOTIFIER_EBADHANDLE);
    }
    let m = notifier_monitor { id: 7 };
    assert_eq!(notifier_monitor_sync(m), NOTIFIER_EBADHANDLE);
    assert_eq!(notifier_monitor_destroy(m), NOTIFIER_EBADHANDLE);
    assert_eq!(notifier_monitor_generation(m), 0);
    assert_eq!(
        notifier_monitor_valid(m, buf.as_ptr().cast(), 1),
        NOTIFIER_EBADHANDLE as i32
    );
    // A pointer that is not an exported libfabric monitor is never read.
    let mut x = 0u64;
    assert_eq!(
        notifier_fi_monitor_destroy((&mut x as *mut u64).cast()),
        NOTIFIER_EBADHANDLE
    );
    assert_eq!(
        notifier_fi_monitor_destroy(core::ptr::null_mut()),
        NOTIFIER_EBADHANDLE
    );
    // NULL out pointers.
    // SAFETY: NULL is allowed and must be reported.
    let st = unsafe { notifier_monitor_create(0, core::ptr::null_mut()) };
    assert_eq!(st, NOTIFIER_ENULL);
}

#[test]
fn registry_through_the_abi() {
    let Some(m) = monitor() else { return };
    let mut r = notifier_registry { id: 0 };
    let cfg = notifier_registry_config::default();
    // SAFETY: valid pointers.
    let st = unsafe { notifier_registry_create(m, &cfg, &mut r) };
    assert_eq!(st, NOTIFIER_OK);
    // A monitor handle is not a registry handle, and the other way round.
    let as_reg = notifier_registry { id: m.id };
    assert_eq!(notifier_registry_destroy(as_reg), NOTIFIER_EBADHANDLE);
    assert_eq!(
        notifier_monitor_sync(notifier_monitor { id: r.id }),
        NOTIFIER_EBADHANDLE
    );
    // The monitor is in use.
    assert_eq!(notifier_monitor_destroy(m), NOTIFIER_EBUSY);

    let map = Map::new(1 << 20);
    let (base, len) = (map.0, map.1);
    assert_eq!(notifier_monitor_watch(m, base, len), NOTIFIER_OK);
    // Overlapping and unaligned watches unite.
    // SAFETY: inside the mapping.
    let mid = unsafe { base.cast::<u8>().add(5000) }.cast::<c_void>();
    assert_eq!(notifier_monitor_watch(m, mid, 3), NOTIFIER_OK);

    let rw =
        NOTIFIER_ACCESS_LOCAL_WRITE | NOTIFIER_ACCESS_REMOTE_READ | NOTIFIER_ACCESS_REMOTE_WRITE;
    let (mut a, mut b) = (notifier_mr::default(), notifier_mr::default());
    // Any alignment: an unaligned malloc-like pointer.
    // SAFETY: valid out pointers.
    unsafe {
        assert_eq!(notifier_registry_get(r, mid, 100, rw, &mut a), NOTIFIER_OK);
        assert_eq!(notifier_registry_get(r, mid, 100, rw, &mut b), NOTIFIER_OK);
    }
    assert_eq!(a, b, "a hit returns the same registration");
    let (mut s, mut e) = (0u64, 0u64);
    // SAFETY: valid pointers.
    unsafe { assert_eq!(notifier_registry_bounds(r, &a, &mut s, &mut e), NOTIFIER_OK) };
    assert!(
        s <= mid as u64 && e >= mid as u64 + 100 && s % 4096 == 0,
        "{s:#x}..{e:#x}"
    );

    // DMA through the rkey reaches the process's memory.
    let mut msg = *b"through the C ABI";
    // SAFETY: valid buffers.
    unsafe {
        let st = notifier_registry_dma(
            r,
            NOTIFIER_DMA_OP_REMOTE_WRITE,
            a.rkey,
            mid as u64,
            msg.as_mut_ptr().cast(),
            msg.len(),
        );
        assert_eq!(st, NOTIFIER_OK, "{}", last_error());
        assert_eq!(
            core::slice::from_raw_parts(mid.cast::<u8>(), msg.len()),
            &msg
        );
    }

    // Typed errors, one code each.
    // SAFETY: valid pointers throughout.
    unsafe {
        assert_eq!(notifier_registry_put(r, &a), NOTIFIER_OK);
        assert_eq!(notifier_registry_put(r, &b), NOTIFIER_OK);
        assert_eq!(notifier_registry_put(r, &b), NOTIFIER_REG_PUT_WITHOUT_GET);
        let mut forged = a;
        forged.handle = [u32::MAX; 4];
        assert_eq!(
            notifier_registry_put(r, &forged),
            NOTIFIER_REG_FOREIGN_HANDLE
        );
        // This registry's id with a slot never issued: stale.
        let mut stale = a;
        stale.handle[0] = (a.handle[0] & 0xff00_0000) | 0x00ff_fff0;
        assert_eq!(notifier_registry_put(r, &stale), NOTIFIER_REG_STALE_HANDLE);
        assert_eq!(
            notifier_registry_get(r, mid, 0, rw, &mut b),
            NOTIFIER_REG_RANGE
        );
        assert_eq!(
            notifier_registry_get(r, mid, 10, NOTIFIER_ACCESS_REMOTE_WRITE, &mut b),
            NOTIFIER_REG_INVALID_ACCESS
        );
        assert_eq!(
            notifier_registry_get(r, mid, 10, rw, core::ptr::null_mut()),
            NOTIFIER_ENULL
        );
        let mut byte = [0u8; 1];
        assert_eq!(
            notifier_registry_dma(r, 99, a.rkey, mid as u64, byte.as_mut_ptr().cast(), 1),
            NOTIFIER_EINVAL
        );
    }
    assert_eq!(notifier_monitor_watch_process(m, 0), NOTIFIER_ENOTSUP);
    assert!(last_error().contains("process-wide"), "{}", last_error());

    // munmap: after sync, the old key is dead and a get registers anew.
    let gen0 = notifier_monitor_generation(m);
    map.unmap();
    assert_eq!(notifier_monitor_sync(m), NOTIFIER_OK);
    assert!(notifier_monitor_generation(m) > gen0);
    let mut byte = [0u8; 1];
    // SAFETY: valid buffer.
    let st = unsafe {
        notifier_registry_dma(
            r,
            NOTIFIER_DMA_OP_REMOTE_READ,
            a.rkey,
            mid as u64,
            byte.as_mut_ptr().cast(),
            1,
        )
    };
    assert!(
        st == NOTIFIER_DMA_INVALIDATED || st == NOTIFIER_DMA_UNKNOWN_KEY,
        "old rkey after munmap: {st:?}"
    );
    let mut stats = notifier_stats::default();
    // SAFETY: valid out pointer.
    unsafe { assert_eq!(notifier_registry_stats(r, &mut stats), NOTIFIER_OK) };
    assert_eq!(stats.invalidations, 1, "{stats:?}");

    assert_eq!(notifier_registry_destroy(r), NOTIFIER_OK);
    assert_eq!(
        notifier_registry_destroy(r),
        NOTIFIER_EBADHANDLE,
        "double destroy"
    );
    assert_eq!(notifier_monitor_destroy(m), NOTIFIER_OK);
    assert_eq!(
        notifier_monitor_destroy(m),
        NOTIFIER_EBADHANDLE,
        "double destroy"
    );
}

static HOOK_CALLS: AtomicU64 = AtomicU64::new(0);
static HOOK_BYTES: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn count_hook(arg: *mut c_void, _addr: *mut c_void, len: usize, ev: u32) {
    assert!(arg.is_null());
    if ev == NOTIFIER_EVENT_UNMAP {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
        HOOK_BYTES.fetch_add(len as u64, Ordering::SeqCst);
    }
}

#[test]
fn hooks_stop_and_from_any_thread() {
    let Some(m) = monitor() else { return };
    let mut id = 0;
    // SAFETY: the hook ignores its (NULL) arg; valid out pointer.
    unsafe {
        assert_eq!(
            notifier_monitor_add_hook(m, None, core::ptr::null_mut(), &mut id),
            NOTIFIER_ENULL
        );
        assert_eq!(
            notifier_monitor_add_hook(m, Some(count_hook), core::ptr::null_mut(), &mut id),
            NOTIFIER_OK
        );
    }
    // Watch and unmap from other threads (all mapped before any unmap, so
    // no address is reused: coalesced invalidations then add up exactly).
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let map = Map::new(64 << 10);
                assert_eq!(notifier_monitor_watch(m, map.0, map.1), NOTIFIER_OK);
                barrier.wait();
                map.unmap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(notifier_monitor_sync(m), NOTIFIER_OK);
    // Unmaps of adjacent mappings may be coalesced into one invalidation.
    let calls = HOOK_CALLS.load(Ordering::SeqCst);
    assert!((1..=4).contains(&calls), "{calls} hook calls");
    assert_eq!(HOOK_BYTES.load(Ordering::SeqCst), 4 * (64 << 10));
    assert_eq!(notifier_monitor_remove_hook(m, id), NOTIFIER_OK);
    assert_eq!(notifier_monitor_remove_hook(m, id), NOTIFIER_EINVAL);

    // Stop: memory stays usable, munmap does not wait, watch is refused.
    let map = Map::new(64 << 10);
    assert_eq!(notifier_monitor_watch(m, map.0, map.1), NOTIFIER_OK);
    assert_eq!(notifier_monitor_stop(m), NOTIFIER_OK);
    // SAFETY: our own mapping, still mapped: first touch after the unwatch.
    unsafe { map.0.cast::<u8>().write_volatile(1) };
    map.unmap();
    let map = Map::new(4096);
    assert_eq!(notifier_monitor_watch(m, map.0, map.1), NOTIFIER_ESTOPPED);
    assert_eq!(notifier_monitor_destroy(m), NOTIFIER_OK);
}

#[cfg(feature = "testing")]
#[test]
fn panics_never_cross_the_boundary() {
    assert_eq!(notifier::testing::notifier_testing_panic(), NOTIFIER_EPANIC);
    assert!(last_error().contains("injected"), "{}", last_error());
    let Some(m) = monitor() else { return };
    let mut r = notifier_registry { id: 0 };
    // SAFETY: valid out pointer.
    let st = unsafe { notifier_registry_create(m, core::ptr::null(), &mut r) };
    assert_eq!(st, NOTIFIER_OK);
    assert_eq!(
        notifier::testing::notifier_testing_panic_in_registry(r),
        NOTIFIER_EPANIC
    );
    let mut s = notifier_stats::default();
    // SAFETY: valid out pointer.
    let st = unsafe { notifier_registry_stats(r, &mut s) };
    assert_eq!(st, NOTIFIER_EPANIC, "a poisoned registry answers EPANIC");
    assert_eq!(notifier_registry_destroy(r), NOTIFIER_OK);
    assert_eq!(notifier_monitor_destroy(m), NOTIFIER_OK);
}
