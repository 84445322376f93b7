//! The interval index: a B+tree of intervals sorted by start, each entry
//! of an inner node augmented with the maximum `last` of its subtree (the
//! kernel's `interval_tree` idea on a cache-friendly layout).
//!
//! Intervals are closed, `[start, last]`. Each interval gets a stable `u32`
//! handle (its slot in a slab) that survives splits and merges, so a
//! subscription can remember it. Entries are ordered by `(start, handle)`.
//!
//! Why a B+tree and not a binary tree: an overlap query walks one
//! root-to-leaf path plus the hits, and in a binary tree over 100,000
//! intervals that is about 20 dependent cache misses; with 16-way nodes it
//! is 5 levels whose keys sit in adjacent cache lines.
//!
//! Overlap queries cost O(log n + k); insert and remove O(log n). Nodes
//! below a quarter full are merged with or refilled from a sibling, so
//! occupancy stays bounded under churn.

/// Entries per node.
const CAP: usize = 16;
/// A non-root node below this is rebalanced with a sibling.
const MIN: usize = CAP / 4;
const NIL: u32 = u32::MAX;
/// Depth bound for the explicit query stack (16-way, u32 handles).
const STACK: usize = 16 * CAP;

/// One node. In a leaf, entry `i` is an interval: key `(start, id)`,
/// `max = last`, `child = id` (its slab handle). In an inner node, entry
/// `i` is a child: key = the child's smallest key, `max` = the child's
/// subtree maximum of `last`, `child` = the node index. One spare slot lets
/// a node overflow by one before it splits.
#[derive(Clone)]
struct Node {
    leaf: bool,
    n: u8,
    start: [u64; CAP + 1],
    max: [u64; CAP + 1],
    id: [u32; CAP + 1],
    child: [u32; CAP + 1],
}

impl Node {
    fn new(leaf: bool) -> Self {
        Self {
            leaf,
            n: 0,
            start: [0; CAP + 1],
            max: [0; CAP + 1],
            id: [0; CAP + 1],
            child: [0; CAP + 1],
        }
    }
    #[inline]
    fn len(&self) -> usize {
        self.n as usize
    }
    #[inline]
    fn key(&self, i: usize) -> (u64, u32) {
        (self.start[i], self.id[i])
    }
    fn subtree_max(&self) -> u64 {
        self.max[..self.len()].iter().copied().max().unwrap_or(0)
    }
    fn insert_at(&mut self, i: usize, start: u64, id: u32, max: u64, child: u32) {
        let n = self.len();
        self.start.copy_within(i..n, i + 1);
        self.id.copy_within(i..n, i + 1);
        self.max.copy_within(i..n, i + 1);
        self.child.copy_within(i..n, i + 1);
        self.start[i] = start;
        self.id[i] = id;
        self.max[i] = max;
        self.child[i] = child;
        self.n += 1;
    }
    fn remove_at(&mut self, i: usize) {
        let n = self.len();
        self.start.copy_within(i + 1..n, i);
        self.id.copy_within(i + 1..n, i);
        self.max.copy_within(i + 1..n, i);
        self.child.copy_within(i + 1..n, i);
        self.n -= 1;
    }
    /// Move entries `[from, n)` to the end of `dst`.
    fn move_tail(&mut self, from: usize, dst: &mut Node) {
        for i in from..self.len() {
            let d = dst.len();
            dst.start[d] = self.start[i];
            dst.id[d] = self.id[i];
            dst.max[d] = self.max[i];
            dst.child[d] = self.child[i];
            dst.n += 1;
        }
        self.n = from as u8;
    }
    /// Index of the child whose subtree holds `key`: the last entry whose
    /// key is `<= key`, or 0.
    #[inline]
    fn find_child(&self, key: (u64, u32)) -> usize {
        let mut i = 0;
        for j in 1..self.len() {
            if self.key(j) <= key {
                i = j;
            } else {
                break;
            }
        }
        i
    }
}

/// An interval tree of values `V` keyed by closed intervals.
pub(crate) struct IntervalTree<V> {
    nodes: Vec<Node>,
    free_nodes: Vec<u32>,
    /// Slab: the start of each live interval and its value.
    starts: Vec<u64>,
    vals: Vec<Option<V>>,
    free_ids: Vec<u32>,
    root: u32,
    len: usize,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IntervalTree<V> {
    /// An empty tree.
    pub(crate) const fn new() -> Self {
        Self {
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            starts: Vec::new(),
            vals: Vec::new(),
            free_ids: Vec::new(),
            root: NIL,
            len: 0,
        }
    }

    /// Number of intervals.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of heap the index holds.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * core::mem::size_of::<Node>()
            + self.free_nodes.capacity() * 4
            + self.starts.capacity() * 8
            + self.vals.capacity() * core::mem::size_of::<Option<V>>()
            + self.free_ids.capacity() * 4
    }

    /// Expected bytes per interval: its slab slot plus its share of a leaf
    /// at two-thirds occupancy (inner nodes add about 1/10 of that).
    pub(crate) const fn node_bytes() -> usize {
        8 + core::mem::size_of::<Option<V>>() + core::mem::size_of::<Node>() * 3 / (2 * CAP)
    }

    fn alloc_node(&mut self, leaf: bool) -> u32 {
        match self.free_nodes.pop() {
            Some(i) => {
                self.nodes[i as usize] = Node::new(leaf);
                i
            }
            None => {
                self.nodes.push(Node::new(leaf));
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Recompute the entry `i` of inner node `x` from its child.
    fn refresh(&mut self, x: u32, i: usize) {
        let c = self.nodes[x as usize].child[i] as usize;
        let (start, id, max) = {
            let cn = &self.nodes[c];
            (cn.start[0], cn.id[0], cn.subtree_max())
        };
        let xn = &mut self.nodes[x as usize];
        xn.start[i] = start;
        xn.id[i] = id;
        xn.max[i] = max;
    }

    /// Insert `[start, last]` and return the interval's stable handle.
    pub(crate) fn insert(&mut self, start: u64, last: u64, val: V) -> u32 {
        debug_assert!(start <= last);
        let id = match self.free_ids.pop() {
            Some(i) => {
                self.starts[i as usize] = start;
                self.vals[i as usize] = Some(val);
                i
            }
            None => {
                self.starts.push(start);
                self.vals.push(Some(val));
                (self.starts.len() - 1) as u32
            }
        };
        if self.root == NIL {
            self.root = self.alloc_node(true);
        }
        if let Some(sib) = self.insert_rec(self.root, (start, id), last) {
            let old = self.root;
            let r = self.alloc_node(false);
            self.nodes[r as usize].n = 2;
            self.nodes[r as usize].child[0] = old;
            self.nodes[r as usize].child[1] = sib;
            self.refresh(r, 0);
            self.refresh(r, 1);
            self.root = r;
        }
        self.len += 1;
        id
    }

    fn insert_rec(&mut self, x: u32, key: (u64, u32), last: u64) -> Option<u32> {
        let xi = x as usize;
        if self.nodes[xi].leaf {
            let n = &mut self.nodes[xi];
            let pos = (0..n.len()).find(|&j| n.key(j) > key).unwrap_or(n.len());
            n.insert_at(pos, key.0, key.1, last, key.1);
        } else {
            let i = self.nodes[xi].find_child(key);
            let c = self.nodes[xi].child[i];
            if let Some(sib) = self.insert_rec(c, key, last) {
                self.nodes[xi].insert_at(i + 1, 0, 0, 0, sib);
                self.refresh(x, i + 1);
            }
            self.refresh(x, i);
        }
        if self.nodes[xi].len() > CAP {
            let leaf = self.nodes[xi].leaf;
            let y = self.alloc_node(leaf);
            let mut yn = Node::new(leaf);
            self.nodes[xi].move_tail(CAP.div_ceil(2), &mut yn);
            self.nodes[y as usize] = yn;
            return Some(y);
        }
        None
    }

    /// Remove the interval `id` (returned by [`Self::insert`]) and return its value.
    pub(crate) fn remove(&mut self, id: u32) -> V {
        let key = (self.starts[id as usize], id);
        assert!(
            self.root != NIL,
            "interval tree: removing from an empty tree"
        );
        self.remove_rec(self.root, key);
        let r = self.root as usize;
        if !self.nodes[r].leaf && self.nodes[r].len() == 1 {
            let child = self.nodes[r].child[0];
            self.free_nodes.push(self.root);
            self.root = child;
        }
        self.len -= 1;
        self.free_ids.push(id);
        self.vals[id as usize]
            .take()
            .expect("interval tree: handle holds a value")
    }

    fn remove_rec(&mut self, x: u32, key: (u64, u32)) {
        let xi = x as usize;
        if self.nodes[xi].leaf {
            let n = &mut self.nodes[xi];
            let pos = (0..n.len())
                .find(|&j| n.key(j) == key)
                .expect("interval tree: handle not found");
            n.remove_at(pos);
            return;
        }
        let i = self.nodes[xi].find_child(key);
        let c = self.nodes[xi].child[i];
        self.remove_rec(c, key);
        if self.nodes[c as usize].len() < MIN && self.nodes[xi].len() > 1 {
            // Rebalance child i with a sibling: merge when both fit in one
            // node, otherwise split their entries evenly.
            let (l, r) = if i + 1 < self.nodes[xi].len() {
                (i, i + 1)
            } else {
                (i - 1, i)
            };
            let (lc, rc) = (
                self.nodes[xi].child[l] as usize,
                self.nodes[xi].child[r] as usize,
            );
            let total = self.nodes[lc].len() + self.nodes[rc].len();
            if total <= CAP {
                let mut right = core::mem::replace(&mut self.nodes[rc], Node::new(true));
                right.move_tail(0, &mut self.nodes[lc]);
                self.free_nodes.push(rc as u32);
                self.nodes[xi].remove_at(r);
                self.refresh(x, l);
            } else {
                // Move entries across the boundary until both hold about half.
                while self.nodes[lc].len() < total / 2 {
                    let rn = &self.nodes[rc];
                    let (st, id, mx, ch) = (rn.start[0], rn.id[0], rn.max[0], rn.child[0]);
                    self.nodes[rc].remove_at(0);
                    let ln = &mut self.nodes[lc];
                    let at = ln.len();
                    ln.insert_at(at, st, id, mx, ch);
                }
                while self.nodes[rc].len() < total / 2 {
                    let ln = &self.nodes[lc];
                    let k = ln.len() - 1;
                    let (st, id, mx, ch) = (ln.start[k], ln.id[k], ln.max[k], ln.child[k]);
                    self.nodes[lc].remove_at(k);
                    self.nodes[rc].insert_at(0, st, id, mx, ch);
                }
                self.refresh(x, l);
                self.refresh(x, r);
            }
        } else if self.nodes[c as usize].len() == 0 {
            // Only child of this node and now empty (cannot happen below a
            // balanced root, kept for safety).
            self.free_nodes.push(c);
            self.nodes[xi].remove_at(i);
        } else {
            self.refresh(x, i);
        }
    }

    /// Call `f` for every interval that shares a point with `[qs, ql]`.
    #[inline]
    pub(crate) fn for_each_overlap(&self, qs: u64, ql: u64, mut f: impl FnMut(u32, &V)) {
        if self.root == NIL {
            return;
        }
        let mut stack = [NIL; STACK];
        let mut sp = 1;
        stack[0] = self.root;
        while sp > 0 {
            sp -= 1;
            let n = &self.nodes[stack[sp] as usize];
            let len = n.len();
            if n.leaf {
                for i in 0..len {
                    if n.start[i] > ql {
                        break;
                    }
                    if n.max[i] >= qs {
                        let id = n.id[i];
                        if let Some(v) = self.vals[id as usize].as_ref() {
                            f(id, v);
                        }
                    }
                }
            } else {
                // Push in reverse so children are visited in key order.
                let mut end = 0;
                while end < len && n.start[end] <= ql {
                    end += 1;
                }
                for i in (0..end).rev() {
                    if n.max[i] >= qs {
                        stack[sp] = n.child[i];
                        sp += 1;
                    }
                }
            }
        }
    }

    /// Whether any interval shares a point with `[qs, ql]`.
    #[cfg(test)]
    pub(crate) fn any_overlap(&self, qs: u64, ql: u64) -> bool {
        let mut any = false;
        self.for_each_overlap(qs, ql, |_, _| any = true);
        any
    }

    /// Every value, in key order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32, &V)) {
        if self.root != NIL {
            self.for_each_rec(self.root, &mut f);
        }
    }

    fn for_each_rec(&self, x: u32, f: &mut impl FnMut(u32, &V)) {
        let n = &self.nodes[x as usize];
        for i in 0..n.len() {
            if n.leaf {
                if let Some(v) = self.vals[n.id[i] as usize].as_ref() {
                    f(n.id[i], v);
                }
            } else {
                self.for_each_rec(n.child[i], f);
            }
        }
    }

    /// Remove everything.
    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.free_nodes.clear();
        self.starts.clear();
        self.vals.clear();
        self.free_ids.clear();
        self.root = NIL;
        self.len = 0;
    }

    /// Check the B+tree and augmentation invariants (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        fn walk<V>(t: &IntervalTree<V>, x: u32, is_root: bool) -> (usize, u64, (u64, u32), usize) {
            let n = &t.nodes[x as usize];
            assert!(n.len() <= CAP);
            if !is_root {
                assert!(n.len() >= 1);
            }
            for i in 1..n.len() {
                assert!(n.key(i - 1) < n.key(i), "keys out of order");
            }
            if n.leaf {
                for i in 0..n.len() {
                    assert_eq!(t.starts[n.id[i] as usize], n.start[i]);
                    assert!(t.vals[n.id[i] as usize].is_some());
                }
                return (1, n.subtree_max(), n.key(0), n.len());
            }
            let mut depth = None;
            let mut count = 0;
            for i in 0..n.len() {
                let (d, m, k, c) = walk(t, n.child[i], false);
                assert_eq!(m, n.max[i], "stale max");
                assert_eq!(k, n.key(i), "stale key");
                assert!(depth.is_none() || depth == Some(d), "uneven depth");
                depth = Some(d);
                count += c;
            }
            (depth.unwrap() + 1, n.subtree_max(), n.key(0), count)
        }
        if self.root == NIL {
            assert_eq!(self.len, 0);
            return;
        }
        let (_, _, _, count) = walk(self, self.root, true);
        assert_eq!(count, self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(usize),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..1000, 0u64..100).prop_map(|(s, l)| Op::Insert(s, s + l)),
            2 => any::<usize>().prop_map(Op::Remove),
            3 => (0u64..1100, 0u64..200).prop_map(|(s, l)| Op::Query(s, s + l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        /// The tree answers every overlap query like a plain `Vec` scan.
        #[test]
        fn matches_vec_model(ops in proptest::collection::vec(op(), 1..1500)) {
            let mut tree = IntervalTree::new();
            let mut model: Vec<(u32, u64, u64, usize)> = Vec::new();
            let mut next = 0usize;
            for op in ops {
                match op {
                    Op::Insert(s, l) => {
                        let idx = tree.insert(s, l, next);
                        model.push((idx, s, l, next));
                        next += 1;
                    }
                    Op::Remove(i) => {
                        if !model.is_empty() {
                            let (idx, _, _, v) = model.swap_remove(i % model.len());
                            prop_assert_eq!(tree.remove(idx), v);
                        }
                    }
                    Op::Query(qs, ql) => {
                        let mut got = Vec::new();
                        tree.for_each_overlap(qs, ql, |_, v| got.push(*v));
                        got.sort_unstable();
                        let mut want: Vec<usize> = model.iter()
                            .filter(|(_, s, l, _)| *s <= ql && *l >= qs)
                            .map(|m| m.3).collect();
                        want.sort_unstable();
                        prop_assert_eq!(tree.any_overlap(qs, ql), !want.is_empty());
                        prop_assert_eq!(got, want);
                    }
                }
                tree.check();
                prop_assert_eq!(tree.len(), model.len());
            }
        }
    }

    #[test]
    fn top_of_address_space() {
        let mut t = IntervalTree::new();
        t.insert(u64::MAX - 0xfff, u64::MAX, 1);
        let mut n = 0;
        t.for_each_overlap(u64::MAX, u64::MAX, |_, _| n += 1);
        assert_eq!(n, 1);
        assert!(!t.any_overlap(0, u64::MAX - 0x1000));
    }

    #[test]
    fn per_interval_bytes_are_small() {
        // Slab (start + value) plus a share of a node at 2/3 occupancy.
        assert!(IntervalTree::<std::sync::Arc<u8>>::node_bytes() <= 64);
    }
}
