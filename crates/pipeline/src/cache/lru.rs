//! A byte-bounded store with least-recently-used eviction: what both caches keep their entries
//! in. Few entries (each is megabytes), so a vector scanned in full is the whole index.

/// One entry and its bookkeeping.
#[derive(Debug)]
struct Slot<T> {
    value: T,
    bytes: usize,
    used: u64,
}

/// Entries within `limit` bytes; the least recently used go first.
#[derive(Debug)]
pub(crate) struct Lru<T> {
    slots: Vec<Slot<T>>,
    limit: usize,
    bytes: usize,
    clock: u64,
    evictions: u64,
}

impl<T> Lru<T> {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            slots: Vec::new(),
            limit,
            bytes: 0,
            clock: 0,
            evictions: 0,
        }
    }

    /// The byte limit (0: the store keeps nothing).
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Entries evicted to make room, since the start.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The entries, in no particular order, with their indices for [`Self::touch`].
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slots.iter().enumerate().map(|(i, s)| (i, &s.value))
    }

    /// Marks entry `i` used now and returns it.
    pub(crate) fn touch(&mut self, i: usize) -> &T {
        self.clock += 1;
        self.slots[i].used = self.clock;
        &self.slots[i].value
    }

    /// Removes the entries `drop` says so of (not counted as evictions).
    pub(crate) fn remove_where(&mut self, mut drop: impl FnMut(&T) -> bool) {
        let mut freed = 0;
        self.slots.retain(|s| {
            let gone = drop(&s.value);
            if gone {
                freed += s.bytes;
            }
            !gone
        });
        self.bytes -= freed;
    }

    /// Adds `value` of `bytes`, evicting the least recently used entries until it fits.
    /// Returns false (and keeps nothing) when it is larger than the whole limit.
    pub(crate) fn insert(&mut self, value: T, bytes: usize) -> bool {
        if bytes > self.limit {
            return false;
        }
        while self.bytes + bytes > self.limit {
            let oldest = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map(|(i, _)| i)
                .expect("bytes held means an entry");
            let s = self.slots.swap_remove(oldest);
            self.bytes -= s.bytes;
            self.evictions += 1;
        }
        self.clock += 1;
        self.slots.push(Slot {
            value,
            bytes,
            used: self.clock,
        });
        self.bytes += bytes;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(l: &Lru<&'static str>) -> Vec<&'static str> {
        let mut v: Vec<_> = l.iter().map(|(_, s)| *s).collect();
        v.sort();
        v
    }

    #[test]
    fn the_least_recently_used_go_first_and_nothing_exceeds_the_limit() {
        // (operation, value, bytes) → entries after it, bytes held, evictions so far.
        let mut l = Lru::new(10);
        assert!(l.insert("a", 4));
        assert!(l.insert("b", 4));
        let a = l.iter().find(|(_, v)| **v == "a").unwrap().0;
        l.touch(a); // b is now the oldest
        assert!(l.insert("c", 4));
        assert_eq!(
            (names(&l), l.bytes(), l.evictions()),
            (vec!["a", "c"], 8, 1)
        );
        assert!(!l.insert("huge", 11), "larger than the limit: refused");
        assert_eq!((names(&l), l.bytes()), (vec!["a", "c"], 8));
        assert!(l.insert("d", 10), "exactly the limit: everything else goes");
        assert_eq!((names(&l), l.bytes(), l.evictions()), (vec!["d"], 10, 3));
        l.remove_where(|v| *v == "d");
        assert_eq!((l.len(), l.bytes(), l.evictions()), (0, 0, 3));
    }

    #[test]
    fn a_zero_limit_keeps_nothing() {
        let mut l = Lru::new(0);
        assert!(!l.insert("a", 1));
        assert_eq!((l.len(), l.bytes(), l.limit()), (0, 0, 0));
    }
}
