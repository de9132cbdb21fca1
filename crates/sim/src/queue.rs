//! The event queue: events ordered by (virtual time, insertion sequence), so
//! two events at the same nanosecond always come out in the order they were
//! scheduled, whatever the heap does.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Virtual time in nanoseconds since the start of a run.
pub type Nanos = u64;

struct Item<E> {
    at: Nanos,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Item<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<E> Eq for Item<E> {}

impl<E> PartialOrd for Item<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Item<E> {
    /// Reversed: the heap is a max-heap and the earliest event must come first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A priority queue of events with a virtual clock.
pub struct Queue<E> {
    heap: BinaryHeap<Item<E>>,
    seq: u64,
    now: Nanos,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E> Queue<E> {
    pub fn new() -> Self {
        Queue {
            heap: BinaryHeap::new(),
            seq: 0,
            now: 0,
        }
    }

    /// The time of the event last popped.
    pub fn now(&self) -> Nanos {
        self.now
    }

    /// Schedules `event` at `at`; an event in the past runs now (after those already due).
    pub fn push(&mut self, at: Nanos, event: E) {
        let at = at.max(self.now);
        self.seq += 1;
        self.heap.push(Item {
            at,
            seq: self.seq,
            event,
        });
    }

    /// The next event, advancing the clock to it.
    pub fn pop(&mut self) -> Option<(Nanos, E)> {
        let item = self.heap.pop()?;
        self.now = item.at;
        Some((item.at, item.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Events scheduled so far.
    pub fn scheduled(&self) -> u64 {
        self.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_keep_insertion_order_and_the_clock_never_goes_back() {
        let mut q = Queue::new();
        q.push(5, "b");
        q.push(3, "a");
        q.push(5, "c");
        assert_eq!(q.pop(), Some((3, "a")));
        q.push(1, "late");
        assert_eq!(q.pop(), Some((3, "late")), "the past runs now");
        assert_eq!(q.pop(), Some((5, "b")));
        assert_eq!(q.pop(), Some((5, "c")));
        assert_eq!(q.pop(), None);
    }
}
