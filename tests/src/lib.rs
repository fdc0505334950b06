//! Support for Cleave's end-to-end tests: the repository's paths, the built binaries, a
//! `cleave-tail` process on an ephemeral port, a `cleave-head` process read line by line, a
//! byte-counting TCP relay, a link emulator whose outages reset connections, and bundle
//! copies with one thing changed.
//!
//! The tests themselves live in `tests/`; everything here is plumbing they share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cleave_link::{LinkEmulator, LinkProfile, OutageMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod head_process;

pub use head_process::HeadProcess;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The bundled model.
pub fn default_bundle() -> PathBuf {
    repo_root().join("models/efficientnet-lite0-split")
}

/// The sample photographs.
pub fn samples() -> PathBuf {
    repo_root().join("models/samples")
}

/// Sorted sample image paths.
pub fn sample_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples())
        .expect("models/samples exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
}

/// Path of a workspace binary built in the same profile as the running test.
///
/// `cargo test --workspace` builds `cleave-head` and `cleave-tail` (their packages have
/// integration tests), so they sit beside the test's `deps/` folder.
///
/// # Panics
///
/// If the binary has not been built.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A `cleave-tail` process, killed on drop.
#[derive(Debug)]
pub struct TailProcess {
    child: Child,
    /// The gRPC address it listens on.
    pub addr: SocketAddr,
    /// The HTTP address, when started with `--http-listen`.
    pub http: Option<SocketAddr>,
}

impl TailProcess {
    /// Starts `cleave-tail --bundle BUNDLE --listen 127.0.0.1:0` and waits for its address.
    ///
    /// # Panics
    ///
    /// If the process does not start or does not print its address.
    pub fn start(bundle: &Path) -> Self {
        Self::start_with(bundle, &[])
    }

    /// Like [`TailProcess::start`], with more flags; reads the HTTP address too when
    /// `extra` has `--http-listen`.
    ///
    /// # Panics
    ///
    /// If the process does not start or does not print its addresses.
    pub fn start_with(bundle: &Path, extra: &[&str]) -> Self {
        Self::start_on(bundle, "127.0.0.1:0", extra)
    }

    /// Like [`TailProcess::start_with`], listening on `listen` (to restart a tail where its
    /// heads expect it).
    ///
    /// # Panics
    ///
    /// If the process does not start or does not print its addresses.
    pub fn start_on(bundle: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(binary("cleave-tail"))
            .args([
                "--bundle",
                &bundle.display().to_string(),
                "--listen",
                listen,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cleave-tail starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut address = |prefix: &str| -> SocketAddr {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .expect("cleave-tail prints its address");
            line.trim()
                .strip_prefix(prefix)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("expected {prefix:?} from cleave-tail, got {line:?}"))
        };
        let addr = address("listening on ");
        let http = extra
            .contains(&"--http-listen")
            .then(|| address("http on "));
        Self { child, addr, http }
    }

    /// The tail's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends SIGTERM (kill on non-unix) without waiting.
    pub fn signal_term(&mut self) {
        #[cfg(unix)]
        {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        #[cfg(not(unix))]
        {
            let _ = self.child.kill();
        }
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    ///
    /// If waiting fails.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("cleave-tail exits")
    }

    /// Freezes the process (SIGSTOP): connections stay open, the kernel still takes bytes,
    /// nothing is answered.
    pub fn pause(&mut self) {
        #[cfg(unix)]
        {
            let _ = Command::new("kill")
                .args(["-STOP", &self.child.id().to_string()])
                .status();
        }
    }

    /// Kills the process at once (SIGKILL): no drain, connections reset.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal_term();
        self.wait()
    }
}

impl Drop for TailProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback that counts the bytes it forwards in each direction.
#[derive(Debug, Clone)]
pub struct CountingRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl CountingRelay {
    /// Starts a relay to `target` on the current tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, u.clone()));
                tokio::spawn(pump(server_read, client_write, d.clone()));
            }
        });
        Ok(Self { addr, up, down })
    }

    /// Bytes forwarded from clients to the target.
    pub fn bytes_up(&self) -> u64 {
        self.up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the target to clients.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(Ordering::SeqCst)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
    }
    let _ = to.shutdown().await;
}

/// Copies the bundle at `from` into a fresh temporary folder, lets `edit` change the
/// manifest's text, and rewrites its `id` line so the copy is a valid bundle with another id.
/// Returns the folder (removed when the returned guard drops).
pub fn bundle_variant(from: &Path, label: &str, edit: impl FnOnce(String) -> String) -> TempDir {
    let dir = TempDir::new(label);
    for entry in std::fs::read_dir(from).expect("bundle folder") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().expect("name")))
                .expect("copy bundle file");
        }
    }
    let manifest = dir.path().join("manifest.toml");
    let text = edit(std::fs::read_to_string(&manifest).expect("manifest"));
    std::fs::write(&manifest, with_recomputed_id(&text)).expect("write manifest");
    dir
}

/// The manifest text with its `id` line set to the id of the rest (the engine's rule).
pub fn with_recomputed_id(text: &str) -> String {
    let id = cleave_engine::Bundle::id_of_manifest(text);
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("id = "))
        .expect("manifest has an id line");
    lines[at] = format!("id = \"{id}\"\n");
    lines.concat()
}

/// A temporary folder under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `cleave-test-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("cleave-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses JSON lines.
///
/// # Panics
///
/// On a line that is not JSON.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A plain HTTP/1.1 GET: `(status, body)`, or `None` if the connection fails.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((status, body))
}

/// A link emulator on an ephemeral loopback port in front of `to`, unshaped, whose outages
/// (`set_down(true)`) reset every connection, as a tail that died does.
///
/// # Panics
///
/// If the emulator cannot start.
pub async fn resetting_link(to: SocketAddr) -> LinkEmulator {
    let profile = LinkProfile {
        outage_mode: OutageMode::Reset,
        ..LinkProfile::default()
    };
    LinkEmulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), to, profile)
        .await
        .expect("the link emulator starts on loopback")
}
