//! The interval index: an arena-allocated AVL tree augmented with the
//! maximum `last` of each subtree (the kernel's `interval_tree`).
//!
//! Intervals are closed, `[start, last]`, as in the kernel, so that a range
//! ending at the top of the address space is representable. Nodes live in a
//! `Vec` and are named by a stable `u32` index: rotations relink nodes and
//! never move their contents, so a subscription can remember its node.
//!
//! Overlap queries cost O(log n + k); insert and remove O(log n).
//! A node is 48 bytes: `start`, `last`, `max` (24), two links (8), height
//! and padding (8), and the value (8 for an `Arc`).

const NIL: u32 = u32::MAX;
/// Deep enough for any AVL tree over `u32` indices (height <= 1.44 log2 n + 2).
const STACK: usize = 96;

struct Node<V> {
    start: u64,
    last: u64,
    max: u64,
    left: u32,
    right: u32,
    height: u8,
    val: Option<V>,
}

/// An interval tree of values `V` keyed by closed intervals.
pub(crate) struct IntervalTree<V> {
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
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
        Self { nodes: Vec::new(), free: Vec::new(), root: NIL, len: 0 }
    }

    /// Number of intervals.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of heap the index holds (node arena and free list capacity).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * core::mem::size_of::<Node<V>>()
            + self.free.capacity() * core::mem::size_of::<u32>()
    }

    /// Size of one node.
    pub(crate) const fn node_bytes() -> usize {
        core::mem::size_of::<Node<V>>()
    }

    #[inline]
    fn key_lt(&self, a: u32, b: u32) -> bool {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        (na.start, a) < (nb.start, b)
    }

    #[inline]
    fn height(&self, t: u32) -> u8 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].height
        }
    }

    #[inline]
    fn update(&mut self, t: u32) {
        let (l, r) = (self.nodes[t as usize].left, self.nodes[t as usize].right);
        let mut max = self.nodes[t as usize].last;
        if l != NIL {
            max = max.max(self.nodes[l as usize].max);
        }
        if r != NIL {
            max = max.max(self.nodes[r as usize].max);
        }
        let h = 1 + self.height(l).max(self.height(r));
        let n = &mut self.nodes[t as usize];
        n.max = max;
        n.height = h;
    }

    fn rotate_right(&mut self, t: u32) -> u32 {
        let l = self.nodes[t as usize].left;
        self.nodes[t as usize].left = self.nodes[l as usize].right;
        self.nodes[l as usize].right = t;
        self.update(t);
        self.update(l);
        l
    }

    fn rotate_left(&mut self, t: u32) -> u32 {
        let r = self.nodes[t as usize].right;
        self.nodes[t as usize].right = self.nodes[r as usize].left;
        self.nodes[r as usize].left = t;
        self.update(t);
        self.update(r);
        r
    }

    fn rebalance(&mut self, t: u32) -> u32 {
        self.update(t);
        let (l, r) = (self.nodes[t as usize].left, self.nodes[t as usize].right);
        let (hl, hr) = (self.height(l) as i32, self.height(r) as i32);
        if hl > hr + 1 {
            let (ll, lr) = (self.nodes[l as usize].left, self.nodes[l as usize].right);
            if self.height(ll) < self.height(lr) {
                let nl = self.rotate_left(l);
                self.nodes[t as usize].left = nl;
            }
            self.rotate_right(t)
        } else if hr > hl + 1 {
            let (rl, rr) = (self.nodes[r as usize].left, self.nodes[r as usize].right);
            if self.height(rr) < self.height(rl) {
                let nr = self.rotate_right(r);
                self.nodes[t as usize].right = nr;
            }
            self.rotate_left(t)
        } else {
            t
        }
    }

    /// Insert `[start, last]` and return the node's stable index.
    pub(crate) fn insert(&mut self, start: u64, last: u64, val: V) -> u32 {
        debug_assert!(start <= last);
        let node = Node { start, last, max: last, left: NIL, right: NIL, height: 1, val: Some(val) };
        let idx = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.root = self.insert_at(self.root, idx);
        self.len += 1;
        idx
    }

    fn insert_at(&mut self, t: u32, idx: u32) -> u32 {
        if t == NIL {
            return idx;
        }
        if self.key_lt(idx, t) {
            let l = self.insert_at(self.nodes[t as usize].left, idx);
            self.nodes[t as usize].left = l;
        } else {
            let r = self.insert_at(self.nodes[t as usize].right, idx);
            self.nodes[t as usize].right = r;
        }
        self.rebalance(t)
    }

    /// Remove the node `idx` (returned by [`Self::insert`]) and return its value.
    pub(crate) fn remove(&mut self, idx: u32) -> V {
        self.root = self.remove_at(self.root, idx);
        self.len -= 1;
        self.free.push(idx);
        let n = &mut self.nodes[idx as usize];
        n.left = NIL;
        n.right = NIL;
        n.val.take().expect("removed node holds a value")
    }

    fn remove_at(&mut self, t: u32, idx: u32) -> u32 {
        assert!(t != NIL, "interval tree: removing a node that is not in the tree");
        if t == idx {
            let (l, r) = (self.nodes[t as usize].left, self.nodes[t as usize].right);
            if l == NIL {
                return r;
            }
            if r == NIL {
                return l;
            }
            let (nr, m) = self.remove_min(r);
            self.nodes[m as usize].left = l;
            self.nodes[m as usize].right = nr;
            return self.rebalance(m);
        }
        if self.key_lt(idx, t) {
            let l = self.remove_at(self.nodes[t as usize].left, idx);
            self.nodes[t as usize].left = l;
        } else {
            let r = self.remove_at(self.nodes[t as usize].right, idx);
            self.nodes[t as usize].right = r;
        }
        self.rebalance(t)
    }

    /// Detach the minimum of subtree `t`: (new subtree root, detached node).
    fn remove_min(&mut self, t: u32) -> (u32, u32) {
        let l = self.nodes[t as usize].left;
        if l == NIL {
            return (self.nodes[t as usize].right, t);
        }
        let (nl, m) = self.remove_min(l);
        self.nodes[t as usize].left = nl;
        (self.rebalance(t), m)
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
            let t = stack[sp];
            let n = &self.nodes[t as usize];
            if n.max < qs {
                continue;
            }
            if n.left != NIL {
                stack[sp] = n.left;
                sp += 1;
            }
            if n.start <= ql {
                if n.last >= qs {
                    if let Some(v) = n.val.as_ref() {
                        f(t, v);
                    }
                }
                if n.right != NIL {
                    stack[sp] = n.right;
                    sp += 1;
                }
            }
        }
    }

    /// Whether any interval shares a point with `[qs, ql]`.
    #[cfg(test)]
    pub(crate) fn any_overlap(&self, qs: u64, ql: u64) -> bool {
        let mut t = self.root;
        // Descend: prefer the left subtree when it can hold an overlap.
        while t != NIL {
            let n = &self.nodes[t as usize];
            if n.max < qs {
                return false;
            }
            if n.start <= ql && n.last >= qs {
                return true;
            }
            let l = n.left;
            if l != NIL && self.nodes[l as usize].max >= qs {
                t = l;
            } else if n.start <= ql {
                t = n.right;
            } else {
                return false;
            }
        }
        false
    }

    /// Every value, in key order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32, &V)) {
        let mut stack = [NIL; STACK];
        let mut sp = 0;
        let mut t = self.root;
        loop {
            while t != NIL {
                stack[sp] = t;
                sp += 1;
                t = self.nodes[t as usize].left;
            }
            if sp == 0 {
                break;
            }
            sp -= 1;
            let n = stack[sp];
            if let Some(v) = self.nodes[n as usize].val.as_ref() {
                f(n, v);
            }
            t = self.nodes[n as usize].right;
        }
    }

    /// Remove everything.
    pub(crate) fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.root = NIL;
        self.len = 0;
    }

    /// Check the AVL and max invariants (tests only).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        fn walk<V>(t: &IntervalTree<V>, n: u32) -> (u8, u64, usize) {
            if n == NIL {
                return (0, 0, 0);
            }
            let node = &t.nodes[n as usize];
            let (hl, ml, cl) = walk(t, node.left);
            let (hr, mr, cr) = walk(t, node.right);
            assert!((hl as i32 - hr as i32).abs() <= 1, "unbalanced");
            assert_eq!(node.height, 1 + hl.max(hr));
            let max = node.last.max(if node.left != NIL { ml } else { 0 }).max(if node.right != NIL { mr } else { 0 });
            assert_eq!(node.max, max);
            if node.left != NIL {
                assert!(t.key_lt(node.left, n));
            }
            if node.right != NIL {
                assert!(t.key_lt(n, node.right));
            }
            (node.height, max, 1 + cl + cr)
        }
        let (_, _, count) = walk(self, self.root);
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
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// The tree answers every overlap query like a plain `Vec` scan.
        #[test]
        fn matches_vec_model(ops in proptest::collection::vec(op(), 1..300)) {
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
    fn node_is_48_bytes_for_arc_values() {
        assert_eq!(IntervalTree::<std::sync::Arc<u8>>::node_bytes(), 48);
    }
}
