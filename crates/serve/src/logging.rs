//! The server's logs: `tracing` events written by a `tracing-subscriber` formatter, filtered the way
//! `RUST_LOG` says (`info` when it is unset).
//!
//! At `info` the server writes one line per HTTP request (the `request` event of
//! [`request_log`](crate::request_log)), and a few lines when it starts and stops. `debug` adds a line per
//! restore and per snapshot (inside the `restore` and `snapshot` spans, which nest under the request's
//! span); actors' own log lines come out at the level they gave, with the target `actor`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The filter when `RUST_LOG` is unset or empty.
pub const DEFAULT_LEVEL: LevelFilter = LevelFilter::INFO;

/// The filter `RUST_LOG` gives (directives such as `info`, `driftwood_serve=debug,warn`), or
/// [`DEFAULT_LEVEL`] when it is unset or empty.
///
/// # Errors
///
/// When `RUST_LOG` is set to something that is not a filter (the message names it).
pub fn env_filter() -> anyhow::Result<EnvFilter> {
    let value = std::env::var("RUST_LOG").unwrap_or_default();
    EnvFilter::builder()
        .with_default_directive(DEFAULT_LEVEL.into())
        .parse(&value)
        .map_err(|e| anyhow::anyhow!("RUST_LOG={value:?} is not a log filter: {e}"))
}

/// A subscriber writing each event as one line of text to `writer`, after `filter`; `ansi` colours the
/// levels.
pub fn subscriber<W>(filter: EnvFilter, writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync + 'static
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi).finish()
}

/// Makes the process's logs go to standard error, filtered by `RUST_LOG` (see [`env_filter`]), coloured
/// when standard error is a terminal.
///
/// # Errors
///
/// When `RUST_LOG` is not a filter, or a global subscriber is set already.
pub fn init() -> anyhow::Result<()> {
    let subscriber = subscriber(env_filter()?, std::io::stderr, std::io::stderr().is_terminal());
    tracing::subscriber::set_global_default(subscriber)
        .map_err(|e| anyhow::anyhow!("the process's log subscriber is set already: {e}"))
}

/// Writes an actor's captured log line as an event of its level (0 error … 4 trace; larger is trace), in
/// the span of the request whose turn it ran (which names the session).
pub(crate) fn actor_line(line: &driftwood_host::LogLine) {
    let text = line.text.as_str();
    match line.level {
        0 => tracing::error!(target: "actor", "{text}"),
        1 => tracing::warn!(target: "actor", "{text}"),
        2 => tracing::info!(target: "actor", "{text}"),
        3 => tracing::debug!(target: "actor", "{text}"),
        _ => tracing::trace!(target: "actor", "{text}"),
    }
}
