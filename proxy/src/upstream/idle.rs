//! The idle HTTP/1.1 connections to one endpoint of an upstream, shared by
//! its pool (which checks them out) and the response bodies (which check
//! them back in when they end), and the worker's requests in flight to it
//! ([`Busy`]), which the pool's choice between endpoints reads.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tokio::time::Instant;

use super::connection::Connection;
use super::PoolSettings;

struct Idle {
    conn: Connection,
    since: Instant,
}

/// A bounded list of idle connections, most recently used last.
pub(crate) struct IdleConnections {
    settings: PoolSettings,
    idle: RefCell<Vec<Idle>>,
    /// This worker's requests in flight to the endpoint.
    busy: Cell<u32>,
    /// When the latest request through this pool started: the clock for
    /// idle bookkeeping, so it reads no clock of its own. It runs behind by
    /// at most one request, which only makes idle connections expire sooner.
    recent: Cell<Instant>,
}

impl IdleConnections {
    pub(crate) fn new(settings: PoolSettings) -> Self {
        Self {
            settings,
            idle: RefCell::new(Vec::new()),
            busy: Cell::new(0),
            recent: Cell::new(Instant::now()),
        }
    }

    /// This worker's requests in flight to the endpoint.
    pub(crate) fn busy(&self) -> u32 {
        self.busy.get()
    }

    /// A request starts now.
    pub(crate) fn set_now(&self, now: Instant) {
        self.recent.set(now);
    }

    /// The most recently used idle connection that is still usable.
    pub(crate) fn checkout(&self) -> Option<Connection> {
        let now = self.recent.get();
        loop {
            let idle = self.idle.borrow_mut().pop()?;
            let expired = now.saturating_duration_since(idle.since) >= self.settings.idle_timeout;
            let mut conn = idle.conn;
            if expired || conn.io.closed_while_idle() {
                continue;
            }
            return Some(conn);
        }
    }

    /// Returns a connection whose exchange has ended, if it can carry another.
    pub(crate) fn checkin(&self, conn: Connection) {
        if !conn.read.is_empty() {
            return;
        }
        // The socket is still marked readable from the response just read.
        conn.io.clear_read_mark();
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.settings.max_idle {
            idle.push(Idle {
                conn,
                since: self.recent.get(),
            });
        }
    }
}

/// A request's place in its endpoint's in-flight count, from the choice of
/// endpoint to the end of the response body (or the failure); given back
/// when dropped. It also carries the way back to the idle list.
pub(crate) struct Busy(Rc<IdleConnections>);

impl Busy {
    pub(crate) fn new(idle: &Rc<IdleConnections>) -> Self {
        idle.busy.set(idle.busy.get() + 1);
        Self(idle.clone())
    }

    /// The endpoint's idle list.
    pub(crate) fn idle(&self) -> &IdleConnections {
        &self.0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.set(self.0.busy.get() - 1);
    }
}
