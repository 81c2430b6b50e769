//! Logging: `tracing` to stderr, plain or one JSON object per line (`--log-format json`), level
//! from `RUST_LOG` (default `info`). Fields are dotted (`client.pid`, `server.name`).
//!
//! Lines an agent's traffic causes (the proxy's `interceptor::mcp` modules at `info` and
//! `warn`: a denied request, a refused body) are kept to [`PER_SECOND`] per call site each
//! second; the rest are counted ([`suppressed`], in `status`), so one agent sending refused
//! requests in a loop cannot flood the journal (whose own rate limit would then drop the
//! daemon's other warnings). The limit is per call site, not per agent: in such a flood other
//! agents' lines of the same kind go too. Every request is in the audit log whatever the log
//! keeps. `debug` lines (asked for) are not limited.

use std::{
    collections::HashMap,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tracing::{Level, Metadata, callsite::Identifier, subscriber::Interest};
use tracing_subscriber::{
    EnvFilter,
    filter::DynFilterFn,
    fmt,
    layer::{Context, Filter},
    prelude::*,
};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, event fields at the top level.
    Json,
}

/// Most lines per second an agent-caused call site writes.
pub const PER_SECOND: u32 = 20;

static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Agent-caused log lines not written (over [`PER_SECOND`] at their call site).
pub fn suppressed() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// Whether `meta` is an event an agent's traffic causes.
fn agent_caused(meta: &Metadata<'_>) -> bool {
    meta.is_event()
        && matches!(*meta.level(), Level::INFO | Level::WARN)
        && meta.target().starts_with("interceptor::mcp")
}

/// The filter of written lines: agent-caused call sites asked at each event, others always.
fn rate_filter<S>() -> impl Filter<S> {
    DynFilterFn::new(|meta: &Metadata<'_>, _: &Context<'_, S>| admit(meta)).with_callsite_filter(
        |meta| {
            if agent_caused(meta) {
                Interest::sometimes()
            } else {
                Interest::always()
            }
        },
    )
}

/// Whether the event at `meta` is written: not an agent-caused line over its call site's rate.
fn admit(meta: &Metadata<'_>) -> bool {
    if !agent_caused(meta) {
        return true;
    }
    static SEEN: LazyLock<Mutex<HashMap<Identifier, (u64, u32)>>> = LazyLock::new(Mutex::default);
    let second = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let (at, count) = seen.entry(meta.callsite()).or_insert((second, 0));
    if *at != second {
        (*at, *count) = (second, 0);
    }
    *count += 1;
    if *count > PER_SECOND {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    true
}

/// Installs the global subscriber. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let result = match format {
        // The level filter outermost, asked first: a line it drops never counts toward the
        // rate.
        LogFormat::Plain => tracing_subscriber::registry()
            .with(layer.with_filter(rate_filter()))
            .with(filter)
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(rate_filter()),
            )
            .with(filter)
            .try_init(),
    };
    // Already installed (tests): keep the existing one.
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the lines written through it.
    struct Lines(std::sync::Arc<AtomicU64>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.iter().filter(|b| **b == b'\n').count();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_agent_caused_call_site_writes_so_many_lines_a_second() {
        let written = std::sync::Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        // As `init` stacks them: the level filter outermost.
        let subscriber = tracing_subscriber::registry()
            .with(
                fmt::layer()
                    .with_writer(move || Lines(counter.clone()))
                    .with_filter(rate_filter()),
            )
            .with(EnvFilter::new("debug,interceptor::mcp::hidden=info"));
        let before = suppressed();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..100 {
                // This module is not an agent-caused one: all written.
                tracing::info!("daemon line");
            }
            for _ in 0..100 {
                tracing::info!(target: "interceptor::mcp::test", "agent line");
            }
            for _ in 0..30 {
                tracing::error!(target: "interceptor::mcp::test", "errors are all written");
            }
            for _ in 0..30 {
                tracing::debug!(target: "interceptor::mcp::test", "debug lines asked for too");
            }
            // Lines the level filter hides do not count toward the rate.
            for _ in 0..30 {
                tracing::debug!(target: "interceptor::mcp::hidden", "not asked for");
            }
        });
        let agent_lines = written.load(Ordering::Relaxed) - 160;
        // Within one second (or two, if the loop straddles a second's end).
        assert!(
            (u64::from(PER_SECOND)..=2 * u64::from(PER_SECOND)).contains(&agent_lines),
            "{agent_lines}"
        );
        assert_eq!(suppressed() - before, 100 - agent_lines);
    }
}
