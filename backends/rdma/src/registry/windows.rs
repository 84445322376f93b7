//! The registry's shared chunks by 1 GiB window number: a sorted vector
//! with a finger on the last window used.
//!
//! Registrations come in runs inside one window, so nearly every lookup
//! is the finger's; the others are one binary search over a few entries
//! (one per window in use, plus up to `MAX_EMPTY_CHUNKS` idle ones). A
//! `BTreeMap` here cost a four-level descent per registration and per
//! deregistration.

use core::cell::Cell;
use std::sync::Arc;

use super::chunk::Chunk;
use crate::provider::ProviderMr;

/// A shared chunk and how many regions use it.
pub(crate) struct ChunkSlot<M: ProviderMr> {
    pub(crate) chunk: Arc<Chunk<M>>,
    pub(crate) members: u32,
}

/// Shared chunks by window number, ascending.
pub(crate) struct Windows<M: ProviderMr> {
    v: Vec<(u64, ChunkSlot<M>)>,
    finger: Cell<usize>,
}

impl<M: ProviderMr> Default for Windows<M> {
    fn default() -> Self {
        Self {
            v: Vec::new(),
            finger: Cell::new(0),
        }
    }
}

impl<M: ProviderMr> Windows<M> {
    /// Number of chunks.
    pub(crate) fn len(&self) -> usize {
        self.v.len()
    }

    /// Position of window `w`, or where it would go.
    #[inline]
    fn find(&self, w: u64) -> Result<usize, usize> {
        let f = self.finger.get();
        if let Some((k, _)) = self.v.get(f) {
            if *k == w {
                return Ok(f);
            }
        }
        let r = self.v.binary_search_by_key(&w, |(k, _)| *k);
        if let Ok(i) = r {
            self.finger.set(i);
        }
        r
    }

    /// The chunk of window `w`.
    #[inline]
    pub(crate) fn get(&self, w: u64) -> Option<&ChunkSlot<M>> {
        self.find(w).ok().map(|i| &self.v[i].1)
    }

    /// The chunk of window `w`, mutably.
    #[inline]
    pub(crate) fn get_mut(&mut self, w: u64) -> Option<&mut ChunkSlot<M>> {
        match self.find(w) {
            Ok(i) => Some(&mut self.v[i].1),
            Err(_) => None,
        }
    }

    /// Insert or replace the chunk of window `w`; returns the old one.
    pub(crate) fn insert(&mut self, w: u64, c: ChunkSlot<M>) -> Option<ChunkSlot<M>> {
        match self.find(w) {
            Ok(i) => Some(core::mem::replace(&mut self.v[i].1, c)),
            Err(i) => {
                self.v.insert(i, (w, c));
                self.finger.set(i);
                None
            }
        }
    }

    /// Keep the chunks for which `keep` is true.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&ChunkSlot<M>) -> bool) {
        self.v.retain(|(_, c)| keep(c));
        self.finger.set(0);
    }
}
