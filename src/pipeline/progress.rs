//! Progress on long work: a bar on a terminal, a line every few seconds otherwise.

use super::memory::{human, rss};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    started: Instant,
    last_line: Instant,
    bytes: u64,
    what: &'static str,
}

impl Progress {
    /// `total` steps of work (units); `what` names them in plain-text lines.
    pub fn new(total: u64, done: u64, what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {pos}/{len} {prefix} {wide_msg} [{elapsed_precise} < {eta}]",
                )
                .unwrap()
                .progress_chars("=> "),
            );
            b.set_position(done);
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        let now = Instant::now();
        Progress { bar, total, started: now, last_line: now - Duration::from_secs(60), bytes: 0, what }
    }

    /// One step finished: `bytes` of input processed, `label` names it.
    pub fn step(&mut self, pos: u64, bytes: u64, label: &str) {
        self.bytes += bytes;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = format!("{}/s", human((self.bytes as f64 / secs) as u64));
        let msg = format!("{label} | {rate} | RSS {}", human(rss()));
        match &self.bar {
            Some(b) => {
                b.set_position(pos);
                b.set_message(msg);
            }
            None => {
                if self.last_line.elapsed() >= Duration::from_secs(2) || pos == self.total {
                    eprintln!("[{pos}/{}] {} {msg}", self.total, self.what);
                    self.last_line = Instant::now();
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
