//! Connection workers: agent connections are served on `daemon.workers` threads, each running
//! its own single-threaded event loop with its own upstream connection pools.
//!
//! Why not the work-stealing runtime for everything: a proxied request there hops between
//! threads (the agent connection's task, the pooled upstream connection's task, whichever
//! thread polled the I/O driver), and every hop to a parked thread is a futex wake-up, an
//! inter-processor interrupt on a VM. Here an agent connection, the upstream connections its
//! requests use and their I/O stay on one thread. Each proxy listener is accepted on by one
//! worker, which serves a new connection itself unless another worker has fewer connections
//! by more than [`BALANCE_SLACK`] (after Envoy's exact connection balancing), so the accepted
//! socket is handed to another thread only when that balances the load (or when its worker
//! stalls: see `accept::STALL_CHECK`). The main runtime keeps the control plane (admin socket,
//! metrics, namespace discovery), as Envoy keeps its main thread apart from its workers.

use std::{
    cell::Cell,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::{
    runtime::Handle,
    sync::{Notify, oneshot},
};

use crate::bpf::lock;

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
    /// Polls of this thread's connection tasks so far: the work [`busy_poll_task`] watches for.
    static WORK: Cell<u64> = const { Cell::new(0) };
    /// Requests of this thread waiting for another thread's answer (see [`AwaitingAnswer`]).
    static AWAITING: Cell<usize> = const { Cell::new(0) };
    /// Notified each time this worker's event loop wakes from a park (see [`busy_poll_task`]).
    static UNPARKED: Arc<Notify> = Arc::new(Notify::new());
}

/// The current thread's slot for per-worker state: `1..=count` on a worker, 0 anywhere else
/// (the main runtime, tests).
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// How often an idle worker wakes up; see [`heartbeat`].
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// Keeps a timer of the worker's due within [`HEARTBEAT`], so that the per-request timers
/// (hyper's header-read timeout, 30 s, armed again after every response) are never the
/// earliest one. Tokio wakes its I/O driver whenever a timer is registered that is due before
/// the driver's planned wake-up, even from the thread that runs the driver and is busy
/// polling (tokio-rs/tokio#5207): with no other timer that was one `write(2)` to the worker's
/// own eventfd and one extra `epoll_wait` per request.
async fn heartbeat() {
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.tick().await;
    }
}

/// Most `daemon.busy_poll` accepted: past this a worker spends whole time slices polling.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// How many more connections than the least loaded worker the accepting worker may serve
/// and still take a new one itself. With none, an agent that opens a connection as its last
/// one closes (the closing one still counted) had every new connection handed to the other
/// worker: an eventfd write and a wake-up of that thread each, about +90 µs on a fresh
/// connection's first request here (docs/benchmarks.md, round 18). A worker takes a new
/// connection while it serves at most this many more than the least loaded one.
pub const BALANCE_SLACK: usize = 1;

/// Busy-poll turns a worker counts before adding them to [`Workers::busy_polling`]'s total.
const TURNS_PUBLISHED: u64 = 64;

/// Busy polling (`daemon.busy_poll`), after HAProxy's `busy-polling`: a worker that waits in
/// `epoll_wait` lets its CPU go idle, and on a VM the next wake-up of an idle vCPU costs an
/// inter-processor interrupt and VM exits, and finds the caches cold; at concurrency 1 that
/// was most of the proxy's added latency (docs/benchmarks.md, round 18). Each time the worker
/// wakes from a park, this task keeps it polling the I/O driver and timers without blocking
/// (it yields, so the event loop looks with a zero timeout and runs what is ready first)
/// until no connection task has run for `period`; then the worker parks as before. When the
/// worker runs out of work meanwhile it calls `idle` (what the park hook does: the deferred
/// audit events are written then, not `period` later). `turns` counts the polls.
async fn busy_poll_task(period: Duration, turns: Arc<AtomicU64>, idle: impl Fn()) {
    let unparked = UNPARKED.with(Arc::clone);
    loop {
        unparked.notified().await;
        let mut seen = WORK.get();
        let mut quiet_since = Instant::now();
        let mut idle_done = false;
        let mut n = 0;
        loop {
            tokio::task::yield_now().await;
            n += 1;
            // Published now and then (the counter is shared by the workers).
            if n == TURNS_PUBLISHED {
                turns.fetch_add(n, Ordering::Relaxed);
                n = 0;
            }
            let work = WORK.get();
            if work != seen {
                seen = work;
                quiet_since = Instant::now();
                idle_done = false;
            } else if !idle_done {
                idle();
                idle_done = true;
            } else if !keeps_polling(quiet_since.elapsed(), period, AWAITING.get()) {
                break;
            }
        }
        turns.fetch_add(n, Ordering::Relaxed);
    }
}

/// A request of this thread waiting for another thread's answer that comes soon (an audit
/// `fdatasync`, hundreds of µs): while one is held, the worker's busy polling goes on until
/// its connections have been quiet for [`MAX_AWAITING_POLL`] (its period, if longer), so the
/// answer is taken by a running CPU (see [`busy_poll_task`]; `fsync` mode at c=1 here: about
/// −100 µs per request). Nothing on a thread without busy polling.
pub struct AwaitingAnswer(bool);

impl AwaitingAnswer {
    /// Counted on a worker thread only (its tasks stay on it, so the drop is on it too).
    pub fn new() -> Self {
        let counted = slot() > 0;
        if counted {
            AWAITING.set(AWAITING.get() + 1);
        }
        Self(counted)
    }
}

impl Default for AwaitingAnswer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AwaitingAnswer {
    fn drop(&mut self) {
        if self.0 {
            AWAITING.set(AWAITING.get().saturating_sub(1));
        }
    }
}

/// How long a worker's connections may be quiet while it busy polls for the answer of an
/// [`AwaitingAnswer`] (its period, if longer): an `fdatasync` takes ~0.1–0.5 ms on SSDs; a
/// slower disk's is waited for parked.
pub const MAX_AWAITING_POLL: Duration = Duration::from_millis(1);

/// Whether a worker whose connections have been quiet for `quiet` keeps busy polling.
fn keeps_polling(quiet: Duration, period: Duration, awaiting: usize) -> bool {
    quiet < period || awaiting > 0 && quiet < MAX_AWAITING_POLL
}

pin_project_lite::pin_project! {
    /// A connection's task, counted as work on its worker each time it is polled (see
    /// [`busy_poll_task`]).
    struct Counted<F> {
        #[pin]
        task: F,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        WORK.set(WORK.get().wrapping_add(1));
        self.project().task.poll(cx)
    }
}

/// The worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Connections each worker serves (index = slot − 1), for [`Workers::spawn_connection`].
    connections: Arc<[AtomicUsize]>,
    /// Workers found stalled (see `accept::STALL_CHECK`): given no new connections. A worker
    /// clears its own flag whenever it goes idle (a worker waiting for work is not stalled).
    stalled: Arc<[AtomicBool]>,
    /// Each worker's stop signal and thread; emptied by [`Workers::stop`].
    threads: Mutex<Vec<(oneshot::Sender<()>, JoinHandle<()>)>>,
    /// `daemon.busy_poll` (zero: off).
    busy_poll: Duration,
    /// Zero-timeout polls made busy polling, all workers together.
    busy_polls: Arc<AtomicU64>,
    /// Notified when a worker's event loop panicked (see [`Workers::failure`]).
    failed: Arc<Notify>,
}

impl Workers {
    /// Starts `count` (at least 1) workers, named `worker-1`…, busy polling for `busy_poll`
    /// after each wake-up (zero: never; see [`busy_poll_task`]); each calls `on_idle` when it
    /// starts and whenever it is about to wait for I/O or timers or runs out of work while
    /// busy polling (the audit log's deferred events). Each runtime
    /// is built on its own thread (a runtime must not be dropped inside another one's async
    /// context, which is where this is called from, should a later worker fail to start).
    pub fn start(
        count: usize,
        busy_poll: Duration,
        on_idle: impl Fn() + Send + Sync + Clone + 'static,
    ) -> io::Result<Self> {
        let count = count.max(1);
        let busy_poll = busy_poll.min(MAX_BUSY_POLL);
        let mut workers = Self {
            handles: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            connections: (0..count).map(|_| AtomicUsize::new(0)).collect(),
            stalled: (0..count).map(|_| AtomicBool::new(false)).collect(),
            threads: Mutex::new(Vec::with_capacity(count)),
            busy_poll,
            busy_polls: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(Notify::new()),
        };
        for index in 1..=count {
            let (stop, stopped) = oneshot::channel::<()>();
            let (ready, handle) = std::sync::mpsc::channel::<io::Result<Handle>>();
            let stalled = workers.stalled.clone();
            let on_idle = on_idle.clone();
            let idle = move || {
                // Read first: a store on every park would dirty a line other workers read.
                let mark = &stalled[index - 1];
                if mark.load(Ordering::Relaxed) {
                    mark.store(false, Ordering::Relaxed);
                }
                on_idle();
            };
            let turns = workers.busy_polls.clone();
            let (failed, unplaced) = (workers.failed.clone(), workers.stalled.clone());
            let thread = std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    SLOT.set(index);
                    idle();
                    let mut builder = tokio::runtime::Builder::new_current_thread();
                    builder.enable_all().on_thread_park(idle.clone());
                    if !busy_poll.is_zero() {
                        builder.on_thread_unpark(|| UNPARKED.with(|u| u.notify_one()));
                    }
                    let runtime = match builder.build() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    // Its panic (one in the idle hook it calls) is the event loop's: see below.
                    let mut polling = (!busy_poll.is_zero())
                        .then(|| runtime.spawn(busy_poll_task(busy_poll, turns, idle)));
                    let _ = ready.send(Ok(runtime.handle().clone()));
                    // Runs the spawned connections until told to stop (or the sender is
                    // gone); dropping the runtime then closes the connections still open.
                    // A panic that escapes it (one in the idle hook: a connection's own is
                    // caught by its task) would leave a worker that takes connections and
                    // drops them: the daemon stops instead, the way it does on SIGTERM (its
                    // audit events written, the kernel refusing tagged agents' MCP connects
                    // until it is restarted), and this worker gets no new connection
                    // meanwhile.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(async {
                            let polled = async {
                                match polling.as_mut() {
                                    Some(task) => task.await,
                                    None => std::future::pending().await,
                                }
                            };
                            tokio::select! {
                                _ = stopped => {}
                                _ = heartbeat() => {}
                                Err(e) = polled => {
                                    if e.is_panic() {
                                        std::panic::resume_unwind(e.into_panic());
                                    }
                                }
                            }
                        })
                    }));
                    if ran.is_err() {
                        tracing::error!(worker = index, "connection worker panicked; the daemon stops (its supervisor restarts it)");
                        unplaced[index - 1].store(true, Ordering::Relaxed);
                        failed.notify_one();
                    }
                })
                .map_err(|e| {
                    io::Error::other(format!(
                        "starting connection worker {index} of {count}: {e}; lower daemon.workers \
                         or raise the service's task limit"
                    ))
                })?;
            // Registered first, so that on an error below `workers` (dropped) stops it.
            lock(&workers.threads).push((stop, thread));
            let handle = handle
                .recv()
                .map_err(|_| io::Error::other(format!("connection worker {index} died starting")))?
                .map_err(|e| {
                    io::Error::other(format!("connection worker {index}: runtime: {e}"))
                })?;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Number of workers.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Resolves once a worker's event loop has panicked (its connections are closed): the
    /// daemon cannot serve as configured and stops.
    pub async fn failure(&self) {
        self.failed.notified().await;
    }

    /// `daemon.busy_poll` as applied, and the zero-timeout polls made busy polling so far.
    pub fn busy_polling(&self) -> (Duration, u64) {
        (self.busy_poll, self.busy_polls.load(Ordering::Relaxed))
    }

    /// Slots of per-worker state to keep: one per worker plus slot 0.
    pub fn slots(count: usize) -> usize {
        count.max(1) + 1
    }

    /// Runs `task` on the next worker (round robin). A stopped worker drops the task, which is
    /// what stopping means. (Connections go through [`Workers::spawn_connection`].)
    #[cfg(test)]
    pub fn spawn(
        &self,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.next().1.spawn(task)
    }

    /// The next worker (round robin): its index (slot − 1) and its event loop.
    pub fn next(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        (i, &self.handles[i])
    }

    /// Marks worker `index` (slot − 1) as stalled: it gets no new connections while another
    /// worker is not stalled, until it next goes idle. Returns whether it was marked already.
    pub fn set_stalled(&self, index: usize) -> bool {
        self.stalled
            .get(index)
            .is_some_and(|flag| flag.swap(true, Ordering::Relaxed))
    }

    /// Whether worker `index` (slot − 1) is marked stalled.
    pub fn is_stalled(&self, index: usize) -> bool {
        self.stalled
            .get(index)
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }

    /// Runs a connection's `task` on the worker serving the fewest connections, the calling
    /// worker when it serves at most [`BALANCE_SLACK`] more than that (no hand-off to another
    /// thread, no wake-up of it), and not on a stalled worker while there is another. The
    /// worker's count includes the task until the task ends or is dropped.
    pub fn spawn_connection(&self, task: impl Future<Output = ()> + Send + 'static) {
        let open = |i: &usize| !self.stalled[*i].load(Ordering::Relaxed);
        let any_open = (0..self.handles.len()).any(|i| open(&i));
        let candidate = |i: &usize| !any_open || open(i);
        let here = slot()
            .checked_sub(1)
            .filter(|h| *h < self.handles.len() && candidate(h));
        let load = |i: usize| self.connections[i].load(Ordering::Relaxed);
        let least = (0..self.handles.len())
            .filter(candidate)
            .min_by_key(|&i| load(i))
            .unwrap_or(0);
        let target = match here {
            Some(h) if load(h) <= load(least) + BALANCE_SLACK => h,
            _ => least,
        };
        let serving = Serving::new(self.connections.clone(), target);
        // A combinator, not an `async` block: a block holding `task` and awaiting it keeps two
        // copies of its state (rust-lang/rust#62958), +1.7 KiB per idle connection measured.
        let task = futures_util::FutureExt::map(task, move |()| drop(serving));
        drop(self.handles[target].spawn(Counted { task }));
    }

    /// Stops every worker and waits for its thread: connections still open are closed. Call it
    /// from outside the workers (a worker cannot join itself); later calls do nothing.
    pub fn stop(&self) {
        let (stops, threads): (Vec<_>, Vec<_>) = std::mem::take(&mut *lock(&self.threads))
            .into_iter()
            .unzip();
        for stop in stops {
            // The receiver is gone only if the worker already ended.
            let _ = stop.send(());
        }
        for thread in threads {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// One connection counted on its worker while alive.
struct Serving {
    connections: Arc<[AtomicUsize]>,
    index: usize,
}

impl Serving {
    fn new(connections: Arc<[AtomicUsize]>, index: usize) -> Self {
        connections[index].fetch_add(1, Ordering::Relaxed);
        Self { connections, index }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.connections[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_worker_threads_round_robin_and_stop_closes_them() {
        let workers = Workers::start(2, Duration::ZERO, || {}).expect("start");
        assert_eq!(slot(), 0, "the calling thread is not a worker");
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            workers.spawn(async move {
                let _ = tx.send((slot(), std::thread::current().name().map(str::to_owned)));
            });
        }
        let mut seen: Vec<_> = (0..4)
            .map(|_| {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .expect("ran")
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (1, Some("worker-1".to_owned())),
                (1, Some("worker-1".to_owned())),
                (2, Some("worker-2".to_owned())),
                (2, Some("worker-2".to_owned())),
            ]
        );
        // A task still pending when the workers stop is dropped (its guard says so).
        let (dropped_tx, dropped_rx) = std::sync::mpsc::channel::<()>();
        struct Guard(std::sync::mpsc::Sender<()>);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let guard = Guard(dropped_tx);
        workers.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        workers.stop();
        dropped_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the pending task was dropped when its worker stopped");
        // Idempotent.
        workers.stop();
    }

    #[test]
    fn a_busy_polling_worker_polls_after_work_then_sleeps() {
        let idles = Arc::new(AtomicUsize::new(0));
        let counted = idles.clone();
        let workers = Workers::start(1, Duration::from_millis(2), move || {
            counted.fetch_add(1, Ordering::Relaxed);
        })
        .expect("start");
        assert_eq!(workers.busy_polling().0, Duration::from_millis(2));
        let (ran, done) = std::sync::mpsc::channel();
        workers.spawn_connection(async move {
            // Work in several polls, as a connection's request and answer come.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            let _ = ran.send(());
        });
        done.recv_timeout(Duration::from_secs(5)).expect("ran");
        let deadline = Instant::now() + Duration::from_secs(10);
        // It polls without sleeping after the work...
        while workers.busy_polling().1 == 0 {
            assert!(Instant::now() < deadline, "no busy polling after work");
            std::thread::sleep(Duration::from_millis(10));
        }
        // ...and then sleeps: the count stops moving (the heartbeat's wake-ups, seconds apart,
        // are followed by 2 ms of polling each).
        let mut last = workers.busy_polling().1;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = workers.busy_polling().1;
            if now == last {
                break;
            }
            assert!(Instant::now() < deadline, "still busy polling after 10 s");
            last = now;
        }
        assert!(idles.load(Ordering::Relaxed) > 1, "the idle hook ran");
    }

    #[test]
    fn a_worker_whose_event_loop_panics_is_reported_and_given_no_connections() {
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        let workers = Workers::start(2, Duration::ZERO, move || {
            if failing.load(Ordering::Relaxed) && slot() == 1 {
                panic!("idle hook");
            }
        })
        .expect("start");
        fail.store(true, Ordering::Relaxed);
        // Woken, worker 1 goes idle again: its hook panics.
        drop(workers.handles[0].spawn(async {}));
        reported(&workers);
        assert!(workers.is_stalled(0) && !workers.is_stalled(1));
        let (ran, on) = std::sync::mpsc::channel();
        workers.spawn_connection(async move {
            let _ = ran.send(slot());
        });
        assert_eq!(on.recv_timeout(Duration::from_secs(5)), Ok(2));
    }

    /// Waits (5 s at most) for `workers` to report a worker's failure.
    fn reported(workers: &Workers) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), workers.failure()).await
        })
        .expect("the panic was reported");
    }

    #[test]
    fn a_panic_in_the_idle_hook_while_busy_polling_is_reported_too() {
        let fail = Arc::new(AtomicBool::new(false));
        let failing = fail.clone();
        // The park hook and the busy-poll task both call the idle hook: the first call after
        // the work below is the task's (the worker does not park while it polls), and only
        // that one panics (a park hook's panic would be reported anyway).
        let calls = Arc::new(AtomicUsize::new(0));
        let called = calls.clone();
        let workers = Workers::start(1, Duration::from_millis(5), move || {
            called.fetch_add(1, Ordering::Relaxed);
            if failing.swap(false, Ordering::Relaxed) {
                panic!("idle hook");
            }
        })
        .expect("start");
        // Parked: called as it started and as it went idle.
        let deadline = Instant::now() + Duration::from_secs(5);
        while calls.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "the worker never went idle");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        fail.store(true, Ordering::Relaxed);
        workers.spawn_connection(async {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        });
        reported(&workers);
    }

    #[test]
    fn a_worker_polls_on_for_an_awaited_answer_within_a_bound() {
        let period = Duration::from_micros(50);
        let ms = Duration::from_millis;
        assert!(keeps_polling(Duration::from_micros(10), period, 0));
        assert!(!keeps_polling(Duration::from_micros(60), period, 0));
        assert!(keeps_polling(Duration::from_micros(600), period, 1));
        assert!(!keeps_polling(ms(2), period, 1));
        // Counted on workers only (elsewhere a task may move between threads).
        drop(AwaitingAnswer::new());
        let held = AwaitingAnswer::new();
        assert_eq!(AWAITING.get(), 0);
        drop(held);
        let workers = Workers::start(1, period, || {}).expect("start");
        let (seen, got) = std::sync::mpsc::channel();
        workers.spawn_connection(async move {
            let held = AwaitingAnswer::new();
            let during = AWAITING.get();
            drop(held);
            let _ = seen.send((during, AWAITING.get()));
        });
        assert_eq!(got.recv_timeout(Duration::from_secs(5)), Ok((1, 0)));
    }

    #[test]
    fn busy_polling_is_bounded_and_off_at_zero() {
        let workers = Workers::start(1, Duration::from_secs(1), || {}).expect("start");
        assert_eq!(workers.busy_polling().0, MAX_BUSY_POLL);
        let workers = Workers::start(1, Duration::ZERO, || {}).expect("start");
        let (ran, done) = std::sync::mpsc::channel();
        workers.spawn_connection(async move {
            let _ = ran.send(());
        });
        done.recv_timeout(Duration::from_secs(5)).expect("ran");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(workers.busy_polling(), (Duration::ZERO, 0));
    }

    #[test]
    fn connections_go_to_the_least_loaded_worker_the_accepting_one_within_the_slack() {
        let workers = Arc::new(Workers::start(2, Duration::ZERO, || {}).expect("start"));
        let (ran, slots) = std::sync::mpsc::channel();
        let (release, released) = tokio::sync::watch::channel(false);
        let hold = |ran: std::sync::mpsc::Sender<usize>| {
            let mut released = released.clone();
            async move {
                let _ = ran.send(slot());
                let _ = released.wait_for(|r| *r).await;
            }
        };
        let next = || {
            slots
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("ran")
        };
        let load = |w: &Workers| -> Vec<usize> {
            w.connections
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect()
        };
        // From outside the workers: the least loaded, the first of equals.
        for expected in [1, 2, 1] {
            workers.spawn_connection(hold(ran.clone()));
            assert_eq!(next(), expected);
        }
        assert_eq!(load(&workers), [2, 1]);
        // Accepted on worker 2, which has fewer: served there.
        let (on, conn) = (workers.clone(), hold(ran.clone()));
        drop(workers.handles[1].spawn(async move { on.spawn_connection(conn) }));
        assert_eq!(next(), 2);
        assert_eq!(load(&workers), [2, 2]);
        // Accepted on worker 1, which now has as many as worker 2, then one more (within
        // the slack): served there.
        for _ in 0..=BALANCE_SLACK {
            let (on, conn) = (workers.clone(), hold(ran.clone()));
            drop(workers.handles[0].spawn(async move { on.spawn_connection(conn) }));
            assert_eq!(next(), 1);
        }
        assert_eq!(load(&workers), [3 + BALANCE_SLACK, 2]);
        // Accepted on worker 1, which has more than the slack allows: handed to worker 2.
        let (on, conn) = (workers.clone(), hold(ran.clone()));
        drop(workers.handles[0].spawn(async move { on.spawn_connection(conn) }));
        assert_eq!(next(), 2);
        assert_eq!(load(&workers), [3 + BALANCE_SLACK, 3]);
        // A worker may still be going idle after its last task, which clears its mark: marked
        // again until the mark holds.
        let mark = |i: usize| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                workers.set_stalled(i);
                std::thread::sleep(std::time::Duration::from_millis(20));
                if workers.is_stalled(i) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "mark {i} never held");
            }
        };
        // A stalled worker gets none while the other is not stalled.
        mark(0);
        assert!(workers.set_stalled(0), "marked already");
        workers.spawn_connection(hold(ran.clone()));
        assert_eq!(next(), 2);
        // Both stalled: placed by load as usual.
        mark(1);
        mark(0);
        workers.spawn_connection(hold(ran.clone()));
        assert_eq!(next(), 1);
        assert_eq!(load(&workers), [5, 4]);
        // A worker that goes idle clears its own mark.
        workers.set_stalled(0);
        drop(workers.handles[0].spawn(async {}));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.is_stalled(0) {
            assert!(std::time::Instant::now() < deadline, "still marked");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Ended connections are no longer counted.
        release.send_replace(true);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while load(&workers) != [0, 0] {
            assert!(std::time::Instant::now() < deadline, "{:?}", load(&workers));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        workers.stop();
    }
}
