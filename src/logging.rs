//! Logs: JSON lines for Lambda (CloudWatch), readable lines on a terminal; always on stderr.
//! On a terminal the progress bars of `sync` ([`bars`]) stay at the bottom and every log line
//! is written above them whole, the bars hidden while it is written, so that none tears a bar.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

use indicatif::MultiProgress;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// The progress bars of this process, drawn on stderr when it is a terminal (hidden
/// otherwise). Log lines are written through them.
pub fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Sets up logging; `RUST_LOG` (or Lambda's `AWS_LAMBDA_LOG_LEVEL`) chooses the level.
pub fn init(json: bool) {
    let json = json
        || std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours, and a quiet log, only for a person at a terminal, not in a file or a pipe.
    let terminal = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(default_filter(
            json,
            terminal,
            std::env::var("AWS_LAMBDA_LOG_LEVEL").ok().as_deref(),
        ))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        let _ = builder
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init();
    } else {
        let _ = builder
            .with_writer(AboveBars(bars()))
            .compact()
            .with_ansi(terminal)
            .try_init();
    }
}

/// The log filter when `RUST_LOG` is not set: on a person's terminal, warnings and errors only
/// (the bars and the answers say the rest); elsewhere (Lambda, a file, a pipe) also this
/// program's `info` lines, or the level Lambda's `AWS_LAMBDA_LOG_LEVEL` names.
pub fn default_filter(json: bool, terminal: bool, lambda_level: Option<&str>) -> String {
    if terminal && !json {
        return "warn".into();
    }
    let level = lambda_level.map_or_else(|| "info".into(), str::to_ascii_lowercase);
    format!("warn,mixpanel_replicator={level}")
}

/// Writes each log line to stderr above the progress bars, whole.
struct AboveBars(&'static MultiProgress);

impl<'a> MakeWriter<'a> for AboveBars {
    type Writer = LogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogLine::new(self.0, |bytes| {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(bytes);
            let _ = err.flush();
        })
    }
}

/// One log line, gathered as it is formatted, then written at once with the bars hidden.
pub struct LogLine<'a> {
    bars: &'a MultiProgress,
    line: Vec<u8>,
    out: fn(&[u8]),
}

impl<'a> LogLine<'a> {
    /// A line that `out` writes, above `bars`, when it is dropped.
    pub fn new(bars: &'a MultiProgress, out: fn(&[u8])) -> Self {
        LogLine {
            bars,
            line: Vec::new(),
            out,
        }
    }
}

impl Write for LogLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let out = self.out;
            self.bars.suspend(|| out(&self.line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_terminal_shows_warnings_and_errors_unless_told() {
        assert_eq!(default_filter(false, true, None), "warn");
        assert_eq!(default_filter(false, true, Some("DEBUG")), "warn");
        assert_eq!(
            default_filter(false, false, None),
            "warn,mixpanel_replicator=info"
        );
        assert_eq!(
            default_filter(true, false, Some("DEBUG")),
            "warn,mixpanel_replicator=debug"
        );
        assert_eq!(
            default_filter(true, true, None),
            "warn,mixpanel_replicator=info"
        );
    }

    /// A terminal of rows and a cursor, as far as the bars and the log lines move it.
    #[derive(Debug, Default)]
    struct Screen {
        rows: Vec<String>,
        row: usize,
    }

    impl Screen {
        fn at(&mut self) -> &mut String {
            while self.rows.len() <= self.row {
                self.rows.push(String::new());
            }
            &mut self.rows[self.row]
        }

        /// Text as it arrives: a newline moves to the next row.
        fn put(&mut self, text: &str) {
            let mut parts = text.split('\n');
            if let Some(first) = parts.next() {
                self.at().push_str(first);
            }
            for part in parts {
                self.row += 1;
                self.at().push_str(part);
            }
        }
    }

    #[derive(Clone, Debug, Default)]
    struct Term(Arc<Mutex<Screen>>);

    impl TermLike for Term {
        fn width(&self) -> u16 {
            80
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            let mut s = self.0.lock().unwrap();
            s.row = s.row.saturating_sub(n);
            Ok(())
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.0.lock().unwrap().row += n;
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().put(&format!("{s}\n"));
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().put(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.0.lock().unwrap().at().clear();
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    static TERM: OnceLock<Term> = OnceLock::new();

    #[test]
    fn a_log_line_is_written_whole_above_the_bars() {
        let term = TERM.get_or_init(Term::default).clone();
        // Drawn at every change (no refresh-rate limit), as the test reads the screen after each.
        let target = ProgressDrawTarget::term_like_with_hz(Box::new(term.clone()), u8::MAX);
        let bars = MultiProgress::with_draw_target(target);
        let bar = bars.add(ProgressBar::new(4));
        bar.set_style(ProgressStyle::with_template("{prefix} {pos}/{len}").unwrap());
        bar.set_prefix("export");
        bar.set_position(1);
        bar.tick();
        // As the formatter writes an event: in pieces, then the line's end.
        let mut line = LogLine::new(&bars, |bytes| {
            TERM.get()
                .unwrap()
                .write_str(std::str::from_utf8(bytes).unwrap())
                .unwrap()
        });
        line.write_all(b"WARN waiting out ").unwrap();
        line.write_all(b"Mixpanel's rate limit\n").unwrap();
        drop(line);
        bar.set_position(2);
        bar.tick();
        let screen = term.0.lock().unwrap();
        let rows: Vec<&str> = screen
            .rows
            .iter()
            .map(|r| r.trim_end())
            .filter(|r| !r.is_empty())
            .collect();
        assert_eq!(
            rows,
            ["WARN waiting out Mixpanel's rate limit", "export 2/4"],
            "{screen:?}"
        );
    }
}
