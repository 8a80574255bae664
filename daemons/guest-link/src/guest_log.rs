//! The one way a guest-triggered line reaches the log: a per-VM limiter.
//!
//! The guest is untrusted, and anything it can make vmhostd log, it can make vmhostd log in a
//! loop. So every such line goes through the [`GuestLog`] of the VM's link, which lives as long
//! as the link (not one connection: a guest that redials resets nothing). It lets a short burst
//! through, then one line per [`LOG_INTERVAL`], counts what it holds back and reports that count
//! (`suppressed=N`) on the next line it lets through.
//!
//! The crate's `clippy.toml` forbids the `tracing` macros (and `println!`/`eprintln!`) in this
//! crate, and the calls that dispatch an event by hand everywhere but [`GuestLog::emit`], so a
//! new log line cannot bypass the limiter by accident (Firecracker does the same with its
//! `rate_limited` logger).

use crate::bucket::TokenBucket;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;
use tracing::callsite::{Callsite, DefaultCallsite};
use tracing::field::FieldSet;
use tracing::metadata::Kind;
use tracing::Metadata;

/// Lines the limiter lets through at once, e.g. "connected", an error and "connection closed".
pub(crate) const LOG_BURST: u32 = 5;
/// After the burst, one line per this long.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Level {
    Info,
    Warn,
}

/// The fields of every guest-link line: `vm`, the message, and `suppressed` when lines were
/// held back before it.
const FIELDS: &[&str] = &["message", "vm", "suppressed"];
const TARGET: &str = "vmhost_guest_link";

static INFO: DefaultCallsite = DefaultCallsite::new(&INFO_META);
static INFO_META: Metadata<'static> = Metadata::new(
    concat!("event ", file!(), ":", line!()),
    TARGET,
    tracing::Level::INFO,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(FIELDS, tracing_core::identify_callsite!(&INFO)),
    Kind::EVENT,
);
static WARN: DefaultCallsite = DefaultCallsite::new(&WARN_META);
static WARN_META: Metadata<'static> = Metadata::new(
    concat!("event ", file!(), ":", line!()),
    TARGET,
    tracing::Level::WARN,
    Some(file!()),
    Some(line!()),
    Some(module_path!()),
    FieldSet::new(FIELDS, tracing_core::identify_callsite!(&WARN)),
    Kind::EVENT,
);

struct State {
    allowance: TokenBucket,
    /// Lines held back since the last one let through.
    suppressed: u64,
    #[cfg(test)]
    emitted: u64,
    #[cfg(test)]
    suppressed_total: u64,
}

/// The log-line budget of one VM's guest.
pub(crate) struct GuestLog {
    vm: String,
    state: Mutex<State>,
}

impl GuestLog {
    pub(crate) fn new(vm: &str) -> Self {
        GuestLog {
            vm: vm.to_string(),
            state: Mutex::new(State {
                allowance: TokenBucket::new(
                    f64::from(LOG_BURST),
                    1.0 / LOG_INTERVAL.as_secs_f64(),
                    Instant::now(),
                ),
                suppressed: 0,
                #[cfg(test)]
                emitted: 0,
                #[cfg(test)]
                suppressed_total: 0,
            }),
        }
    }

    /// Logs `message` at info level if the VM's budget allows, else counts it.
    pub(crate) fn info(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Info, message);
    }

    /// Logs `message` at warn level if the VM's budget allows, else counts it.
    pub(crate) fn warn(&self, message: fmt::Arguments<'_>) {
        self.log(Level::Warn, message);
    }

    fn log(&self, level: Level, message: fmt::Arguments<'_>) {
        let suppressed = {
            let mut state = self.state.lock().unwrap();
            if !state.allowance.take(Instant::now()) {
                state.suppressed += 1;
                #[cfg(test)]
                {
                    state.suppressed_total += 1;
                }
                return;
            }
            #[cfg(test)]
            {
                state.emitted += 1;
            }
            std::mem::take(&mut state.suppressed)
        };
        self.emit(level, message, suppressed);
    }

    /// The limiter's own output: the one place guest-triggered lines reach `tracing`.
    ///
    /// It builds the event by hand instead of with `tracing::warn!`: clippy (1.95, rust-clippy
    /// #14017) reports the attributes inside `tracing`'s macro expansions at crate level, so
    /// no `#[allow(clippy::disallowed_macros)]` short of the crate root silences them, and
    /// that would switch the check off everywhere. `Event::dispatch` is in turn a
    /// disallowed method, which clippy does let a function allow.
    #[allow(clippy::disallowed_methods)] // The limiter's exit: callers were rate-limited above.
    fn emit(&self, level: Level, message: fmt::Arguments<'_>, suppressed: u64) {
        let callsite = match level {
            Level::Info => &INFO,
            Level::Warn => &WARN,
        };
        let meta = callsite.metadata();
        // What `tracing::event!` checks before it dispatches.
        let enabled = *meta.level() <= tracing::level_filters::STATIC_MAX_LEVEL
            && *meta.level() <= tracing::level_filters::LevelFilter::current()
            && {
                let interest = callsite.interest();
                !interest.is_never()
                    && (interest.is_always()
                        || tracing::dispatcher::get_default(|dispatch| dispatch.enabled(meta)))
            };
        if !enabled {
            return;
        }
        let fields = meta.fields();
        let field = |name: &str| fields.field(name).expect("the callsite declares it");
        let vm = tracing::field::display(&self.vm);
        let suppressed = (suppressed > 0).then_some(suppressed);
        tracing::Event::dispatch(
            meta,
            &fields.value_set(&[
                (
                    &field("message"),
                    Some(&format_args!("guest link: {message}") as &dyn tracing::Value),
                ),
                (&field("vm"), Some(&vm as &dyn tracing::Value)),
                (
                    &field("suppressed"),
                    suppressed.as_ref().map(|n| n as &dyn tracing::Value),
                ),
            ]),
        );
    }

    /// Lines let through so far.
    #[cfg(test)]
    pub(crate) fn emitted_lines(&self) -> u64 {
        self.state.lock().unwrap().emitted
    }

    /// Lines held back so far.
    #[cfg(test)]
    pub(crate) fn suppressed_lines(&self) -> u64 {
        self.state.lock().unwrap().suppressed_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;

    /// A `tracing` writer that keeps what it is given.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_lets_a_burst_through_then_one_line_per_interval_and_reports_the_rest() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let log = GuestLog::new("db1");
        for i in 0..100 {
            log.warn(format_args!("line {i}"));
        }
        assert_eq!(log.emitted_lines(), u64::from(LOG_BURST));
        assert_eq!(log.suppressed_lines(), 100 - u64::from(LOG_BURST));

        // Not yet a whole interval: still held back.
        tokio::time::advance(LOG_INTERVAL / 2).await;
        log.warn(format_args!("too early"));
        assert_eq!(log.emitted_lines(), u64::from(LOG_BURST));

        // One interval refills one line, which reports everything held back.
        tokio::time::advance(LOG_INTERVAL / 2 + Duration::from_millis(1)).await;
        log.info(format_args!("connected"));
        log.warn(format_args!("held back"));
        assert_eq!(log.emitted_lines(), u64::from(LOG_BURST) + 1);

        let lines = capture.lines();
        assert_eq!(lines.len(), LOG_BURST as usize + 1, "{lines:#?}");
        assert!(lines[0].contains("WARN") && lines[0].contains("guest link: line 0"));
        assert!(lines[0].contains("vm=db1") && !lines[0].contains("suppressed"));
        let last = lines.last().unwrap();
        assert!(last.contains("INFO") && last.contains("guest link: connected"));
        // 95 from the loop, plus "too early".
        assert!(last.contains("suppressed=96"), "{last}");

        // The next line reports only what came after.
        tokio::time::advance(LOG_INTERVAL + Duration::from_millis(1)).await;
        log.warn(format_args!("again"));
        let last = capture.lines().pop().unwrap();
        assert!(last.contains("suppressed=1"), "{last}");
    }

    #[test]
    fn lines_below_the_subscribers_level_are_filtered_out() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let log = GuestLog::new("db2");
        log.info(format_args!("connected"));
        log.warn(format_args!("malformed"));
        let lines = capture.lines();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("guest link: malformed") && lines[0].contains("vm=db2"));
    }
}
