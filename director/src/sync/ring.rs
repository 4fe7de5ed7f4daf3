//! A bounded single-producer single-consumer ring of `Copy` records, allocated once.
//!
//! The data path pushes connection changes into one and the sync task pops them (and the reverse for
//! records received from the peer), so neither side ever locks or allocates per record. It is the classic
//! Lamport ring: the producer owns `tail`, the consumer owns `head`, each publishes its index with a
//! release store and reads the other's with an acquire load; each side also caches the other's index so
//! that a push or pop usually touches only its own cache line.

use std::cell::{Cell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[repr(align(64))]
struct Padded(AtomicUsize);

struct Shared<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    /// Next slot the consumer reads (monotonic, wrapping).
    head: Padded,
    /// Next slot the producer writes (monotonic, wrapping).
    tail: Padded,
}

// SAFETY: a slot is written only by the single producer before it publishes `tail`, and read only by the
// single consumer after it observed that `tail` (acquire), and before it publishes `head` (release); the
// producer reuses a slot only after observing that `head`. `T: Copy` has no drop to run.
unsafe impl<T: Copy + Send> Sync for Shared<T> {}
unsafe impl<T: Copy + Send> Send for Shared<T> {}

/// The writing end.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    tail: usize,
    head_cache: Cell<usize>,
}

/// The reading end.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    head: usize,
    tail_cache: Cell<usize>,
}

// SAFETY: each end is used by one thread at a time (`&mut self` for the operations that move indexes).
unsafe impl<T: Copy + Send> Send for Producer<T> {}
unsafe impl<T: Copy + Send> Send for Consumer<T> {}

/// A ring of at least `capacity` records (rounded up to a power of two, at least 2).
pub fn ring<T: Copy + Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    let capacity = capacity.max(2).next_power_of_two();
    let slots = (0..capacity).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect();
    let shared = Arc::new(Shared {
        slots,
        mask: capacity - 1,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
    });
    (
        Producer { shared: Arc::clone(&shared), tail: 0, head_cache: Cell::new(0) },
        Consumer { shared, head: 0, tail_cache: Cell::new(0) },
    )
}

impl<T: Copy + Send> Producer<T> {
    pub fn capacity(&self) -> usize {
        self.shared.slots.len()
    }

    /// Free slots as of now (the consumer may free more meanwhile).
    pub fn free(&self) -> usize {
        let mut used = self.tail.wrapping_sub(self.head_cache.get());
        if used == self.capacity() {
            self.head_cache.set(self.shared.head.0.load(Ordering::Acquire));
            used = self.tail.wrapping_sub(self.head_cache.get());
        }
        self.capacity() - used
    }

    /// Appends `value`, or gives it back when the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free() == 0 {
            return Err(value);
        }
        let slot = &self.shared.slots[self.tail & self.shared.mask];
        // SAFETY: the slot is free (see `Shared`); only this producer writes it.
        unsafe { (*slot.get()).write(value) };
        self.tail = self.tail.wrapping_add(1);
        self.shared.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }
}

impl<T: Copy + Send> Consumer<T> {
    /// Records waiting, as of now.
    pub fn len(&self) -> usize {
        let mut ready = self.tail_cache.get().wrapping_sub(self.head);
        if ready == 0 {
            self.tail_cache.set(self.shared.tail.0.load(Ordering::Acquire));
            ready = self.tail_cache.get().wrapping_sub(self.head);
        }
        ready
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The oldest record, if any.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.is_empty() {
            return None;
        }
        let slot = &self.shared.slots[self.head & self.shared.mask];
        // SAFETY: the producer published this slot (acquire above) and will not touch it until `head` moves.
        let value = unsafe { (*slot.get()).assume_init_read() };
        self.head = self.head.wrapping_add(1);
        self.shared.head.0.store(self.head, Ordering::Release);
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_refuses_and_drains_in_order() {
        let (mut tx, mut rx) = ring::<u32>(3);
        assert_eq!(tx.capacity(), 4);
        for i in 0..4 {
            tx.push(i).unwrap();
        }
        assert_eq!(tx.push(9), Err(9));
        assert_eq!(rx.len(), 4);
        assert_eq!(rx.pop(), Some(0));
        tx.push(4).unwrap();
        let drained: Vec<_> = std::iter::from_fn(|| rx.pop()).collect();
        assert_eq!(drained, [1, 2, 3, 4]);
        assert!(rx.is_empty());
    }

    #[test]
    fn two_threads_pass_every_record_once_in_order() {
        const N: u64 = 200_000;
        let (mut tx, mut rx) = ring::<u64>(64);
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            while i < N {
                if tx.push(i).is_ok() {
                    i += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
        });
        let mut expected = 0;
        while expected < N {
            if let Some(v) = rx.pop() {
                assert_eq!(v, expected);
                expected += 1;
            } else {
                std::hint::spin_loop();
            }
        }
        producer.join().unwrap();
        assert_eq!(rx.pop(), None);
    }
}
