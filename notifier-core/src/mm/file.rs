//! A shared file object with a page cache (`struct address_space`).
//!
//! The page cache maps a page offset to a frame and holds one reference on
//! it. Shared mappings map the cached frame itself; private mappings map it
//! read-only and copy it on the first write. A fault beyond the file's size
//! is a bus error (SIGBUS), as in the kernel.
//!
//! # Locking
//! The cache mutex is taken under the mmap lock and before any leaf lock;
//! page-metadata shards nest inside it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::MmError;
use super::page_meta::Memory;
use crate::frame::Pfn;
use crate::{PAGE_SHIFT, PAGE_SIZE};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How a file is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Size in pages; faults at or beyond it are bus errors.
    pub pages: u64,
    /// Whether the file's mappings may become nonlinear
    /// (`VM_CAN_NONLINEAR`, needed by `remap_file_pages`).
    pub can_nonlinear: bool,
}

impl FileOptions {
    /// A file of `pages` pages that supports nonlinear mappings.
    pub const fn new(pages: u64) -> Self {
        Self {
            pages,
            can_nonlinear: true,
        }
    }
}

/// A shared file: its size and page cache.
pub struct FileObj {
    id: u64,
    opts: FileOptions,
    mem: Arc<Memory>,
    cache: Mutex<BTreeMap<u64, Pfn>>,
}

impl core::fmt::Debug for FileObj {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FileObj")
            .field("id", &self.id)
            .field("opts", &self.opts)
            .finish()
    }
}

impl FileObj {
    pub(crate) fn new(mem: Arc<Memory>, opts: FileOptions) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            opts,
            mem,
            cache: Mutex::new(BTreeMap::new()),
        })
    }

    /// A stable identity for this file.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Size in pages.
    pub fn pages(&self) -> u64 {
        self.opts.pages
    }

    /// Whether mappings of this file may be made nonlinear.
    pub fn can_nonlinear(&self) -> bool {
        self.opts.can_nonlinear
    }

    /// The cached frame of page `pgoff`, reading it in (a zeroed frame) if
    /// absent (`find_or_create_page`). The cache keeps its own reference;
    /// the caller gets none.
    ///
    /// # Errors
    /// [`MmError::Bus`] at or beyond the end of the file (reported at
    /// `addr`), [`MmError::OutOfMemory`].
    pub(crate) fn find_or_create(&self, pgoff: u64, addr: u64) -> Result<Pfn, MmError> {
        if pgoff >= self.opts.pages {
            return Err(MmError::Bus { addr });
        }
        let mut c = self.cache.lock();
        if let Some(p) = c.get(&pgoff) {
            return Ok(*p);
        }
        let pfn = self.mem.alloc_page(false)?;
        c.insert(pgoff, pfn);
        Ok(pfn)
    }

    /// The page index of cached frame `pfn` (the kernel's `page->index`),
    /// if the cache holds it. Linear in the cache size: only reclaim and
    /// zap of nonlinear mappings ask.
    pub(crate) fn index_of(&self, pfn: Pfn) -> Option<u64> {
        self.cache
            .lock()
            .iter()
            .find_map(|(i, p)| (*p == pfn).then_some(*i))
    }

    /// The cached frame of `pgoff`, if any.
    pub fn cached(&self, pgoff: u64) -> Option<Pfn> {
        self.cache.lock().get(&pgoff).copied()
    }

    /// Pages in the cache.
    pub fn cached_pages(&self) -> usize {
        self.cache.lock().len()
    }

    /// Write into the file through the page cache (`pwrite`).
    ///
    /// # Errors
    /// [`MmError::Bus`] beyond the end of the file, [`MmError::OutOfMemory`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MmError> {
        self.io(offset, data.len(), |pfn, off, range| {
            self.mem
                .frames
                .write(pfn, off, &data[range])
                .map_err(MmError::from)
        })
    }

    /// Read from the file through the page cache (`pread`).
    ///
    /// # Errors
    /// As [`Self::write`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MmError> {
        let mut tmp = vec![0u8; buf.len()];
        self.io(offset, buf.len(), |pfn, off, range| {
            self.mem
                .frames
                .read(pfn, off, &mut tmp[range])
                .map_err(MmError::from)
        })?;
        buf.copy_from_slice(&tmp);
        Ok(())
    }

    fn io(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(Pfn, usize, core::ops::Range<usize>) -> Result<(), MmError>,
    ) -> Result<(), MmError> {
        let mut done = 0usize;
        while done < len {
            let pos = offset
                .checked_add(done as u64)
                .ok_or(MmError::Bus { addr: offset })?;
            let pgoff = pos >> PAGE_SHIFT;
            let within = (pos & (PAGE_SIZE - 1)) as usize;
            let n = (PAGE_SIZE as usize - within).min(len - done);
            let pfn = self.find_or_create(pgoff, pos)?;
            f(pfn, within, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Replace the cached frame `old` of `pgoff` by `new` (migration);
    /// false if the cache no longer holds `old` there.
    pub(crate) fn replace(&self, pgoff: u64, old: Pfn, new: Pfn) -> bool {
        let mut c = self.cache.lock();
        match c.get_mut(&pgoff) {
            Some(p) if *p == old => {
                *p = new;
                true
            }
            _ => false,
        }
    }
}

impl Drop for FileObj {
    fn drop(&mut self) {
        for (_, pfn) in core::mem::take(&mut *self.cache.lock()) {
            self.mem.put_page(pfn);
        }
    }
}
