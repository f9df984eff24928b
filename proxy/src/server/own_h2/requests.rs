//! The requests of one HTTP/2 connection, polled by the connection's own
//! task.
//!
//! Why not a task per request: spawning one cost about as much as the rest
//! of the stream's bookkeeping (an aligned allocation, the scheduler's
//! queue, a join handle), and every answer then had to be handed back. Here
//! each request waits in a slot; the slot's waker, made once per slot and
//! reused by every request that later takes the slot, queues the slot and
//! wakes the connection, so a wakeup polls only the requests it concerns
//! (what `futures::stream::FuturesUnordered` does, without the dependency).
//! A stale wakeup of a slot since reused costs one spurious poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use super::HpackBlock;
use crate::server::hyper::Answered;

/// One request's future: the answer to a stream.
pub(super) type Answer = Pin<Box<dyn Future<Output = Answered<HpackBlock>>>>;

/// The requests at work on one connection.
#[derive(Default)]
pub(super) struct Requests {
    slots: Vec<Slot>,
    /// Slots without a request.
    free: Vec<usize>,
    queue: Arc<ReadyQueue>,
    /// Reused: the slots taken off the queue by one `poll`.
    ready: Vec<usize>,
}

struct Slot {
    /// The stream, and its request's future.
    request: Option<(u32, Answer)>,
    state: Arc<SlotWaker>,
    waker: Waker,
}

/// The slots woken since the connection last looked, and the connection's
/// waker. Wakers must be `Send`, hence the lock; only this thread ever
/// takes it, so it is never contended.
#[derive(Default)]
struct ReadyQueue {
    woken: Mutex<Woken>,
}

#[derive(Default)]
struct Woken {
    slots: Vec<usize>,
    connection: Option<Waker>,
}

/// A slot's waker.
struct SlotWaker {
    slot: usize,
    /// Already in the queue: not queued twice.
    queued: AtomicBool,
    queue: Arc<ReadyQueue>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut woken = self.queue.woken.lock().unwrap_or_else(|e| e.into_inner());
        woken.slots.push(self.slot);
        if let Some(connection) = &woken.connection {
            connection.wake_by_ref();
        }
    }
}

impl Requests {
    /// Adds `stream`'s request; returns its slot. It is polled on the next
    /// [`Requests::poll`].
    pub(super) fn push(&mut self, stream: u32, answer: Answer) -> usize {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = self.slots.len();
                let state = Arc::new(SlotWaker {
                    slot,
                    queued: AtomicBool::new(false),
                    queue: self.queue.clone(),
                });
                self.slots.push(Slot {
                    request: None,
                    waker: Waker::from(state.clone()),
                    state,
                });
                slot
            }
        };
        self.slots[slot].request = Some((stream, answer));
        self.slots[slot].waker.wake_by_ref();
        slot
    }

    /// Drops the request in `slot` (its stream was reset or closed): the
    /// upstream exchange goes with it.
    pub(super) fn cancel(&mut self, slot: usize) {
        if self.slots[slot].request.take().is_some() {
            self.free.push(slot);
        }
    }

    /// Drops every request.
    pub(super) fn clear(&mut self) {
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            if entry.request.take().is_some() {
                self.free.push(slot);
            }
        }
    }

    /// Polls the requests woken since the last call; those done go into
    /// `answered` with their streams. `connection` is woken when more are.
    pub(super) fn poll(
        &mut self,
        connection: &Waker,
        answered: &mut Vec<(u32, Answered<HpackBlock>)>,
    ) {
        {
            let mut woken = self.queue.woken.lock().unwrap_or_else(|e| e.into_inner());
            if !woken
                .connection
                .as_ref()
                .is_some_and(|w| w.will_wake(connection))
            {
                woken.connection = Some(connection.clone());
            }
            std::mem::swap(&mut woken.slots, &mut self.ready);
        }
        for i in 0..self.ready.len() {
            let slot = &mut self.slots[self.ready[i]];
            // Cleared first: a wakeup during the poll queues the slot again.
            slot.state.queued.store(false, Ordering::Release);
            let Some((stream, request)) = &mut slot.request else {
                continue;
            };
            let stream = *stream;
            let mut cx = Context::from_waker(&slot.waker);
            if let Poll::Ready(response) = request.as_mut().poll(&mut cx) {
                slot.request = None;
                self.free.push(self.ready[i]);
                answered.push((stream, response));
            }
        }
        self.ready.clear();
    }
}
