//! A `cleave-head` process whose JSON lines are read as it prints them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::{binary, default_bundle};

/// Longest the tests wait for one line or address before failing.
const PATIENCE: Duration = Duration::from_secs(120);

/// `cleave-head --bundle <default bundle> FLAGS INPUTS`, killed on drop. Its stderr is passed
/// through, and the address it prints for `--metrics-listen` is kept.
#[derive(Debug)]
pub struct HeadProcess {
    child: Child,
    lines: mpsc::Receiver<Value>,
    metrics: mpsc::Receiver<SocketAddr>,
    /// Lines read so far, in order.
    pub seen: Vec<Value>,
}

impl HeadProcess {
    /// Starts the head with `stdin` (`Stdio::piped()` to feed it, see
    /// [`HeadProcess::take_stdin`]).
    ///
    /// # Panics
    ///
    /// If the binary does not start, or prints a line that is not JSON.
    pub fn start(flags: &[&str], inputs: &[PathBuf], stdin: Stdio) -> Self {
        let mut child = Command::new(binary("cleave-head"))
            .arg("--bundle")
            .arg(default_bundle())
            .args(flags)
            .args(inputs)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cleave-head starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (line_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if line_tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let (metrics_tx, metrics) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if let Some(addr) = line
                    .strip_prefix("cleave-head: metrics on http://")
                    .and_then(|a| a.strip_suffix("/metrics"))
                    .and_then(|a| a.parse().ok())
                {
                    let _ = metrics_tx.send(addr);
                }
            }
        });
        Self {
            child,
            lines,
            metrics,
            seen: Vec::new(),
        }
    }

    /// The head's stdin, once.
    ///
    /// # Panics
    ///
    /// If it was not piped or was taken already.
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin piped, taken once")
    }

    /// The next line (also kept in `seen`).
    ///
    /// # Panics
    ///
    /// If none comes within two minutes.
    pub fn next_line(&mut self) -> Value {
        let line = self
            .lines
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no line after {} lines", self.seen.len()));
        self.seen.push(line.clone());
        line
    }

    /// Waits until `n` lines have been printed in all.
    ///
    /// # Panics
    ///
    /// As [`HeadProcess::next_line`].
    pub fn wait_for_lines(&mut self, n: usize) {
        while self.seen.len() < n {
            self.next_line();
        }
    }

    /// The address of its `/metrics` (started with `--metrics-listen`).
    ///
    /// # Panics
    ///
    /// If it prints none within two minutes.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .recv_timeout(PATIENCE)
            .expect("cleave-head prints its metrics address")
    }

    /// Whether it is still running.
    ///
    /// # Panics
    ///
    /// If the process cannot be polled.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll cleave-head").is_none()
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for it to exit; returns its exit code and every line it printed.
    ///
    /// # Panics
    ///
    /// If waiting fails.
    pub fn finish(mut self) -> (Option<i32>, Vec<Value>) {
        let status = self.child.wait().expect("cleave-head exits");
        let mut lines = std::mem::take(&mut self.seen);
        lines.extend(self.lines.try_iter());
        // The reader thread may still be draining the pipe after the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            lines.push(line);
        }
        (status.code(), lines)
    }
}

impl Drop for HeadProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
