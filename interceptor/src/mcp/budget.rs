//! What the proxy may hold in memory at once of the bodies it reads whole: agents' request
//! bodies (judged before anything is forwarded) and upstream JSON answers (filtered before
//! they are relayed).
//!
//! Each is bounded on its own (`proxy.max_body_bytes`, `proxy.max_response_bytes`), but many
//! at once are not: one agent with a thousand connections of sixteen HTTP/2 streams, each
//! sending a body just under the limit slowly, would hold gigabytes, and the daemon killed
//! for memory refuses every agent on the node (fail closed). So the bytes held are counted as
//! they arrive, node-wide (`proxy.max_buffered_bytes`) and per cgroup
//! (`proxy.max_buffered_bytes_per_cgroup`, so one agent cannot take it all); a body that would
//! go over is refused with HTTP 503 and its bytes released at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::bpf::lock;

/// Bytes held (or, for [`Counted::Requests`], requests in flight), node-wide and by cgroup.
#[derive(Debug)]
pub struct Budget {
    total: usize,
    per_cgroup: usize,
    counted: Counted,
    used: Mutex<Used>,
}

/// What a [`Budget`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Bytes of bodies held (`proxy.max_buffered_bytes*`).
    Bytes,
    /// Requests in flight, from their head to their answer's last byte: each holds an upstream
    /// connection while it waits or streams (`proxy.max_requests_in_flight*`).
    Requests,
}

#[derive(Debug, Default)]
struct Used {
    total: usize,
    by_cgroup: HashMap<u64, usize>,
}

/// Which bound a body would have gone over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `proxy.max_buffered_bytes`: every agent's bodies together.
    Node,
    /// `proxy.max_buffered_bytes_per_cgroup`: this cgroup's.
    Cgroup,
    /// `proxy.max_requests_in_flight`: every agent's requests together.
    NodeRequests,
    /// `proxy.max_requests_in_flight_per_cgroup`: this cgroup's.
    CgroupRequests,
}

impl Over {
    /// What to tell the agent and the log.
    pub fn reason(self) -> &'static str {
        match self {
            Over::Node => {
                "the proxy holds as many request and answer bodies as it may \
                 (proxy.max_buffered_bytes); try again shortly"
            }
            Over::Cgroup => {
                "this cgroup's agents have as many request and answer bodies in flight as \
                 they may (proxy.max_buffered_bytes_per_cgroup); try again once some are done"
            }
            Over::NodeRequests => {
                "the proxy has as many requests and streams in flight as it may \
                 (proxy.max_requests_in_flight); try again shortly"
            }
            Over::CgroupRequests => {
                "this cgroup's agents have as many requests and streams in flight as they may \
                 (proxy.max_requests_in_flight_per_cgroup); try again once some are done"
            }
        }
    }
}

/// Bytes a body holds of the budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    cgroup: u64,
    bytes: usize,
}

/// Why a body was not read.
#[derive(Debug)]
pub enum Refused {
    /// Over the body's own limit.
    TooLarge,
    /// Over the budget.
    Over(Over),
    /// The body could not be read.
    Read(crate::mcp::BoxError),
}

impl Budget {
    pub fn new(total: usize, per_cgroup: usize, counted: Counted) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_cgroup,
            counted,
            used: Mutex::default(),
        })
    }

    /// The bound gone over, node-wide or this cgroup's, in what this budget counts.
    fn over(&self, node: bool) -> Over {
        match (self.counted, node) {
            (Counted::Bytes, true) => Over::Node,
            (Counted::Bytes, false) => Over::Cgroup,
            (Counted::Requests, true) => Over::NodeRequests,
            (Counted::Requests, false) => Over::CgroupRequests,
        }
    }

    /// An empty holding for a body of `cgroup`'s.
    pub fn hold(self: &Arc<Self>, cgroup: u64) -> Held {
        Held {
            budget: self.clone(),
            cgroup,
            bytes: 0,
        }
    }

    /// Bytes held now, node-wide.
    pub fn used(&self) -> usize {
        lock(&self.used).total
    }
}

impl Held {
    /// Takes `n` more bytes, unless that goes over a bound.
    pub fn take(&mut self, n: usize) -> Result<(), Over> {
        let budget = &self.budget;
        let mut used = lock(&budget.used);
        if used.total + n > budget.total {
            return Err(budget.over(true));
        }
        let mine = used.by_cgroup.entry(self.cgroup).or_default();
        if *mine + n > budget.per_cgroup {
            if *mine == 0 {
                used.by_cgroup.remove(&self.cgroup);
            }
            return Err(budget.over(false));
        }
        *mine += n;
        used.total += n;
        self.bytes += n;
        Ok(())
    }

    /// Holds `n` bytes from now on: takes more, unless that goes over a bound, or gives back
    /// what is no longer held.
    pub fn hold_exactly(&mut self, n: usize) -> Result<(), Over> {
        if n > self.bytes {
            return self.take(n - self.bytes);
        }
        self.give_back(self.bytes - n);
        Ok(())
    }

    /// Gives `n` of the bytes held back to the budget.
    fn give_back(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let mut used = lock(&self.budget.used);
        used.total -= n;
        if let Some(mine) = used.by_cgroup.get_mut(&self.cgroup) {
            *mine -= n;
            if *mine == 0 {
                used.by_cgroup.remove(&self.cgroup);
            }
        }
        self.bytes -= n;
    }

    /// Reads `body` whole, at most `limit` bytes, taking each chunk from the budget as it
    /// arrives (never more than what was read).
    pub async fn collect<B>(&mut self, body: B, limit: usize) -> Result<Bytes, Refused>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<crate::mcp::BoxError>,
    {
        let mut body = std::pin::pin!(body);
        let mut out = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Refused::Read(e.into()))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if out.len() + data.len() > limit {
                return Err(Refused::TooLarge);
            }
            self.take(data.len()).map_err(Refused::Over)?;
            out.extend_from_slice(data);
        }
        Ok(out.freeze())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.give_back(self.bytes);
    }
}

/// Largest frame a [`HeldBody`] gives at once: hyper hands each frame whole to the
/// connection's buffers (h2's send buffer, HTTP/1's write buffer), so one frame of a large
/// answer would leave the budget while still in memory, waiting for a reader that may never
/// read.
const HELD_FRAME: usize = 64 * 1024;

/// A response body that holds its bytes' share of the budget until its last frame is taken
/// (or it is dropped): frames of at most [`HELD_FRAME`] bytes, so what an agent does not read
/// stays counted.
pub struct HeldBody {
    rest: Bytes,
    held: Option<Held>,
}

impl HeldBody {
    pub fn new(bytes: Bytes, held: Held) -> Self {
        Self {
            rest: bytes,
            held: Some(held),
        }
    }
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            this.held = None;
            return std::task::Poll::Ready(None);
        }
        let frame = this.rest.split_to(this.rest.len().min(HELD_FRAME));
        if this.rest.is_empty() {
            // The last frame: hyper has the rest now.
            this.held = None;
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A response body that holds its request's place among those in flight (a [`Held`] of a
/// [`Counted::Requests`] budget) until its last frame is taken, or it is dropped.
pub struct WithHeld<B> {
    body: B,
    held: Option<Held>,
}

impl<B> WithHeld<B> {
    pub fn new(body: B, held: Held) -> Self {
        Self {
            body,
            held: Some(held),
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for WithHeld<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            this.held = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_in_flight_are_held_until_their_answer_ends() {
        use http_body_util::{BodyExt, Full};
        let budget = Budget::new(3, 2, Counted::Requests);
        let mut a = budget.hold(1);
        assert_eq!(a.take(1), Ok(()));
        let mut b = budget.hold(1);
        assert_eq!(b.take(1), Ok(()));
        assert_eq!(budget.hold(1).take(1), Err(Over::CgroupRequests));
        let mut c = budget.hold(2);
        assert_eq!(c.take(1), Ok(()));
        assert_eq!(budget.hold(3).take(1), Err(Over::NodeRequests));
        // Given back when the answer's last frame is taken, not before.
        let mut body = WithHeld::new(Full::new(Bytes::from_static(b"answer")), a);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let frame = rt.block_on(body.frame()).expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"answer")));
        assert_eq!(budget.used(), 3);
        assert!(rt.block_on(body.frame()).is_none());
        assert_eq!(budget.used(), 2);
        // Or when it is dropped unread.
        drop(WithHeld::new(Full::new(Bytes::new()), b));
        drop(c);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn bytes_are_counted_per_cgroup_and_node_wide_and_given_back() {
        let budget = Budget::new(100, 60, Counted::Bytes);
        let mut a = budget.hold(1);
        assert_eq!(a.take(50), Ok(()));
        assert_eq!(a.take(20), Err(Over::Cgroup));
        let mut b = budget.hold(2);
        assert_eq!(b.take(51), Err(Over::Node));
        assert_eq!(b.take(40), Ok(()));
        assert_eq!(budget.used(), 90);
        drop(a);
        assert_eq!(budget.used(), 40);
        let mut c = budget.hold(1);
        assert_eq!(c.take(60), Ok(()));
        drop((b, c));
        assert_eq!(budget.used(), 0);
        // What a stream's parser holds, followed up and down.
        let mut d = budget.hold(3);
        assert_eq!(d.hold_exactly(40), Ok(()));
        assert_eq!(d.hold_exactly(70), Err(Over::Cgroup));
        assert_eq!(d.hold_exactly(10), Ok(()));
        assert_eq!(budget.used(), 10);
        drop(d);
        assert_eq!(budget.used(), 0);
        assert!(lock(&budget.used).by_cgroup.is_empty());
    }

    #[tokio::test]
    async fn an_answer_holds_its_share_until_its_last_frame_is_taken() {
        let budget = Budget::new(1 << 20, 1 << 20, Counted::Bytes);
        let mut held = budget.hold(1);
        held.take(100_000).unwrap();
        let mut body = HeldBody::new(Bytes::from(vec![b'x'; 100_000]), held);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), HELD_FRAME);
        assert_eq!(budget.used(), 100_000, "still counted while frames remain");
        let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(last.len(), 100_000 - HELD_FRAME);
        assert_eq!(budget.used(), 0);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_is_read_within_its_limit_and_the_budget() {
        let budget = Budget::new(1000, 1000, Counted::Bytes);
        let mut held = budget.hold(1);
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert_eq!(held.collect(body, 5).await.unwrap(), "hello");
        assert_eq!(budget.used(), 5);
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert!(matches!(
            budget.hold(1).collect(body, 4).await,
            Err(Refused::TooLarge)
        ));
        let small = Budget::new(3, 3, Counted::Bytes);
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert!(matches!(
            small.hold(1).collect(body, 10).await,
            Err(Refused::Over(Over::Node))
        ));
        assert_eq!(small.used(), 0);
    }
}
