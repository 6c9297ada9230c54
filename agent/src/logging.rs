//! The agent's log: one stream on stdout, every line in one format, the flow events
//! ([`crate::operator::flows`]) included.
//!
//! - `--log-format json`: one JSON object per line, the same envelope for every
//!   line: `timestamp` (RFC 3339, UTC), `level`, `target`, `message`, then the
//!   event's fields flat beside them as plain values (strings, numbers, booleans;
//!   a field that is `None` is left out).
//! - `--log-format text`: `timestamp level target: message key=value ...`, in colour
//!   only on a terminal, and never with `NO_COLOR` set.
//! - Which lines: `--log-level` when given, else `RUST_LOG`'s directives (e.g.
//!   `info,rayfence::source=debug`), else `info`. Flow events (target
//!   [`FLOW_TARGET`]) are on whatever the level unless a directive names that target:
//!   `--flow-log off` is the switch for them.
//!
//! Must not: be set up by the operator commands (their stdout is their answer).
use std::ffi::OsStr;
use std::fmt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The target of flow events in the log.
pub const FLOW_TARGET: &str = "rayfence::flows";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For a person: `timestamp level target: message key=value`.
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// How the agent logs; see the module header for what each field does.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `--log-level`: wins over `rust_log`.
    pub level: Option<LogLevel>,
    /// `RUST_LOG`, as read from the environment.
    pub rust_log: Option<String>,
    /// Flow events are logged (`--flow-log stdout`).
    pub flows: bool,
    /// Colour (text only).
    pub colour: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("RUST_LOG {value:?}: not a valid filter (e.g. info,rayfence::source=debug)")]
    Filter {
        value: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("setting up the log")]
    Init(#[source] tracing::subscriber::SetGlobalDefaultError),
}

/// Colour on a terminal only, and not when `NO_COLOR` is set to anything but ""
/// (<https://no-color.org>).
pub fn colour(format: LogFormat, stdout_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    format == LogFormat::Text && stdout_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The filter: `--log-level`, else `RUST_LOG`, else `info`; flow events on unless
/// the directives name [`FLOW_TARGET`].
pub fn filter(config: &LogConfig) -> Result<EnvFilter, LogError> {
    let base = match (config.level, config.rust_log.as_deref().map(str::trim)) {
        (Some(level), _) => level.directive().to_owned(),
        (None, Some(text)) if !text.is_empty() => text.to_owned(),
        (None, _) => "info".to_owned(),
    };
    let directives = if config.flows && !base.contains(FLOW_TARGET) {
        format!("{base},{FLOW_TARGET}=info")
    } else {
        base.clone()
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|source| LogError::Filter {
            value: base,
            source,
        })
}

/// The subscriber for `config`, writing to `writer`.
pub fn subscriber<W>(
    config: &LogConfig,
    writer: W,
) -> Result<Box<dyn tracing::Subscriber + Send + Sync>, LogError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(config)?)
        .with_writer(writer)
        .with_ansi(config.colour && config.format == LogFormat::Text);
    Ok(match config.format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    })
}

/// Sets the process's subscriber, writing to stdout.
pub fn init(config: &LogConfig) -> Result<(), LogError> {
    tracing::subscriber::set_global_default(subscriber(config, std::io::stdout)?)
        .map_err(LogError::Init)
}

/// `a,b,c`: a list as one plain log value.
pub fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&item.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("buffer")).into_owned()
        }
    }

    fn config(format: LogFormat) -> LogConfig {
        LogConfig {
            format,
            level: None,
            rust_log: None,
            flows: true,
            colour: false,
        }
    }

    /// Logs an ordinary line, one with `None` fields and a flow line through `config`.
    fn log_lines(config: &LogConfig) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = subscriber(config, move || writer.clone()).expect("subscriber");
        tracing::subscriber::with_default(subscriber, || {
            let path = std::path::Path::new("/sys/fs/bpf/rayfence");
            let nothing: Option<&str> = None;
            tracing::info!(
                bpffs = Some(tracing::field::display(path.display())),
                via = nothing.map(tracing::field::display),
                adopted = 2,
                "datapath loaded"
            );
            tracing::debug!("not at info");
            tracing::info!(target: FLOW_TARGET, verdict = "dropped", bytes = 60, "flow");
        });
        buffer.text()
    }

    fn json_lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
        text.lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(serde_json::Value::Object(map)) => map,
                other => panic!("not a JSON object: {line}: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn json_lines_share_one_envelope_with_flat_plain_fields() {
        let text = log_lines(&config(LogFormat::Json));
        let lines = json_lines(&text);
        assert_eq!(lines.len(), 2, "{text}");
        for line in &lines {
            for key in ["timestamp", "level", "target", "message"] {
                assert!(line.contains_key(key), "{key} missing: {line:?}");
            }
            let stamp = line["timestamp"].as_str().expect("a string");
            assert!(
                stamp.parse::<jiff::Timestamp>().is_ok() && stamp.ends_with('Z'),
                "{stamp}"
            );
            assert!(
                line.values().all(|v| !v.is_object() && !v.is_array()),
                "{line:?}"
            );
        }
        assert_eq!(lines[0]["bpffs"], "/sys/fs/bpf/rayfence");
        assert_eq!(lines[0]["adopted"], 2);
        assert!(!lines[0].contains_key("via"), "None is left out: {text}");
        assert!(!text.contains("Some("), "{text}");
        assert_eq!(lines[1]["target"], FLOW_TARGET);
        assert_eq!(lines[1]["bytes"], 60);
    }

    #[test]
    fn text_has_no_colour_unless_asked_and_colour_needs_a_terminal_without_no_color() {
        let text = log_lines(&config(LogFormat::Text));
        assert!(text.contains("datapath loaded") && text.contains("bpffs=/sys/fs/bpf/rayfence"));
        assert!(!text.contains('\x1b'), "{text:?}");
        let coloured = log_lines(&LogConfig {
            colour: true,
            ..config(LogFormat::Text)
        });
        assert!(coloured.contains('\x1b'), "{coloured:?}");

        assert!(colour(LogFormat::Text, true, None));
        assert!(colour(LogFormat::Text, true, Some(OsStr::new(""))));
        assert!(!colour(LogFormat::Text, true, Some(OsStr::new("1"))));
        assert!(!colour(LogFormat::Text, false, None));
        assert!(!colour(LogFormat::Json, true, None));
    }

    #[test]
    fn log_level_wins_over_rust_log_and_flows_stay_on_at_any_level() {
        let warn_by_rust_log = LogConfig {
            rust_log: Some("warn".into()),
            ..config(LogFormat::Json)
        };
        let lines = json_lines(&log_lines(&warn_by_rust_log));
        assert_eq!(lines.len(), 1, "only the flow line: {lines:?}");
        assert_eq!(lines[0]["target"], FLOW_TARGET);

        let debug_by_flag = LogConfig {
            level: Some(LogLevel::Debug),
            ..warn_by_rust_log.clone()
        };
        assert_eq!(json_lines(&log_lines(&debug_by_flag)).len(), 3);

        let no_flows = LogConfig {
            rust_log: Some(format!("info,{FLOW_TARGET}=off")),
            ..config(LogFormat::Json)
        };
        assert_eq!(json_lines(&log_lines(&no_flows)).len(), 1);
    }

    #[test]
    fn a_bad_rust_log_is_named() {
        let error = filter(&LogConfig {
            rust_log: Some("info,rayfence=loud".into()),
            ..config(LogFormat::Text)
        })
        .expect_err("invalid");
        assert!(error.to_string().contains("RUST_LOG"), "{error}");
    }

    #[test]
    fn lists_are_one_plain_value() {
        assert_eq!(list(["a", "b"]), "a,b");
        assert_eq!(list(Vec::<u32>::new()), "");
    }
}
