//! Where frames come from: image files, folders (once, or watched for new files), raw RGB
//! frames on stdin, and a replay of a folder at a fixed frame rate.
//!
//! Every source runs as its own task and hands [`SourceFrame`]s to the pipeline over a
//! bounded channel. A live source stamps each with the moment it was captured, and the
//! frame's deadline counts from then, so a replay or a camera that the pipeline cannot keep up with shows up as
//! expired frames, not as a clock that silently slows down. File sources simply wait for
//! room (nothing is lost by reading a file later). A source that ends closes the channel;
//! a watched folder never ends on its own.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use image::RgbImage;
use tokio::sync::mpsc;

use crate::HeadError;

/// File extensions treated as images when walking a folder.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The picture of one frame.
#[derive(Debug, Clone)]
pub enum Picture {
    /// An image file, decoded by the pipeline.
    File(PathBuf),
    /// Pixels already in memory (stdin, camera).
    Rgb(RgbImage),
}

/// One frame from a source.
#[derive(Debug, Clone)]
pub struct SourceFrame {
    /// What the report calls it: the file's path, or `stdin#N`.
    pub name: String,
    /// The picture.
    pub picture: Picture,
    /// When it was captured: read from stdin, seen in a watched folder, or due, for a
    /// replay. `None` for files given on the command line, which have no moment: their
    /// deadline counts from when the pipeline takes them.
    pub captured: Option<Instant>,
}

/// What to read frames from.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// Files and folders (each folder's images sorted by name), once, in order.
    Files(Vec<PathBuf>),
    /// A folder's images in name order, then every image that appears in it later, forever.
    /// A new file is taken once its size and modification time have held still for one
    /// poll, so a file still being written is not read half-done.
    Watch {
        /// The folder.
        dir: PathBuf,
        /// How often to look for new files.
        poll: Duration,
    },
    /// Raw frames on stdin: `width × height × 3` bytes each, RGB, row by row (as
    /// `ffmpeg -f rawvideo -pix_fmt rgb24` writes them), until end of input.
    StdinRaw {
        /// Pixels per row.
        width: u32,
        /// Rows.
        height: u32,
    },
    /// A folder's images at `fps` frames per second, `loops` times over (0: forever).
    Replay {
        /// The folder.
        dir: PathBuf,
        /// Frames per second.
        fps: f64,
        /// Passes over the folder; 0 repeats forever.
        loops: u32,
    },
    /// A V4L2 camera (`v4l2` feature, Linux), until stopped. A frame that finds the pipeline
    /// busy is dropped, not queued (`docs/camera.md`).
    #[cfg(feature = "v4l2")]
    Camera(crate::camera::CameraSpec),
}

/// Starts `spec` on the current runtime; frames arrive on the receiver, at most `buffer`
/// ahead of the pipeline.
///
/// # Errors
///
/// [`HeadError::Input`] for a path that does not exist, a folder that cannot be read or
/// holds no images (for `Files` and `Replay`), or a zero frame size or rate.
pub fn start(spec: SourceSpec, buffer: usize) -> Result<mpsc::Receiver<SourceFrame>, HeadError> {
    let (tx, rx) = mpsc::channel(buffer.max(1));
    match spec {
        SourceSpec::Files(inputs) => {
            let files = expand_inputs(&inputs)?;
            tokio::spawn(async move {
                for path in files {
                    let frame = SourceFrame {
                        captured: None,
                        ..file_frame(path)
                    };
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                }
            });
        }
        SourceSpec::Watch { dir, poll } => {
            check_dir(&dir)?;
            tokio::spawn(watch(dir, poll, tx));
        }
        SourceSpec::StdinRaw { width, height } => {
            if width == 0 || height == 0 {
                return Err(input_error(
                    "stdin",
                    "frame size must be at least 1×1".into(),
                ));
            }
            tokio::task::spawn_blocking(move || {
                read_raw(std::io::stdin().lock(), width, height, &tx)
            });
        }
        SourceSpec::Replay { dir, fps, loops } => {
            if !(fps.is_finite() && fps > 0.0) {
                return Err(input_error(
                    &dir.display().to_string(),
                    format!(
                        "replay rate must be a positive number of frames per second, not {fps}"
                    ),
                ));
            }
            let files = expand_inputs(std::slice::from_ref(&dir))?;
            tokio::spawn(replay(files, fps, loops, tx));
        }
        #[cfg(feature = "v4l2")]
        SourceSpec::Camera(camera) => {
            // The capture thread ends on its own when the receiver is dropped, and logs why.
            crate::camera::start_camera(camera, tx)?;
        }
    }
    Ok(rx)
}

fn file_frame(path: PathBuf) -> SourceFrame {
    SourceFrame {
        name: path.display().to_string(),
        picture: Picture::File(path),
        captured: Some(Instant::now()),
    }
}

fn input_error(path: &str, reason: String) -> HeadError {
    HeadError::Input {
        path: path.to_string(),
        reason,
    }
}

fn check_dir(dir: &Path) -> Result<(), HeadError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(input_error(
            &dir.display().to_string(),
            "not a folder".into(),
        )),
        Err(e) => Err(input_error(&dir.display().to_string(), e.to_string())),
    }
}

/// Expands files and folders into the list of image files to process, in order: files as
/// given, each folder's images sorted by name (not recursive).
///
/// # Errors
///
/// [`HeadError::Input`] for a path that does not exist or a folder that cannot be read or
/// holds no images.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, HeadError> {
    let mut files = Vec::new();
    for input in inputs {
        let input_err = |reason: String| input_error(&input.display().to_string(), reason);
        let meta = std::fs::metadata(input).map_err(|e| input_err(e.to_string()))?;
        if meta.is_dir() {
            let found = images_in(input).map_err(|e| input_err(e.to_string()))?;
            if found.is_empty() {
                return Err(input_err(
                    "folder holds no .jpg, .jpeg or .png files".into(),
                ));
            }
            files.extend(found);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

/// A folder's image files, sorted by name.
fn images_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| is_image(p))
        .collect();
    found.sort();
    Ok(found)
}

fn is_image(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Size and modification time: a file whose stamp held still for a poll is complete.
fn stamp(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

async fn watch(dir: PathBuf, poll: Duration, tx: mpsc::Sender<SourceFrame>) {
    let mut taken: BTreeSet<PathBuf> = BTreeSet::new();
    // Files there at start are complete; later ones must hold still for a poll first.
    let mut settling: Vec<(PathBuf, Option<(u64, SystemTime)>)> = Vec::new();
    let mut first = true;
    loop {
        let found = match images_in(&dir) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the watched folder");
                Vec::new()
            }
        };
        let mut ready = Vec::new();
        for path in found {
            if taken.contains(&path) {
                continue;
            }
            let now = stamp(&path);
            let before = settling.iter().find(|(p, _)| *p == path).map(|(_, s)| *s);
            if first || (before.is_some() && before == Some(now)) {
                ready.push(path);
            } else {
                settling.retain(|(p, _)| *p != path);
                settling.push((path, now));
            }
        }
        first = false;
        ready.sort();
        for path in ready {
            settling.retain(|(p, _)| *p != path);
            taken.insert(path.clone());
            if tx.send(file_frame(path)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            () = tx.closed() => return,
        }
    }
}

async fn replay(files: Vec<PathBuf>, fps: f64, loops: u32, tx: mpsc::Sender<SourceFrame>) {
    let interval = Duration::from_secs_f64(1.0 / fps);
    let start = tokio::time::Instant::now();
    let mut k: u32 = 0;
    let passes = if loops == 0 { u32::MAX } else { loops };
    for _ in 0..passes {
        for path in &files {
            let due = start + interval.saturating_mul(k);
            tokio::time::sleep_until(due).await;
            k = k.saturating_add(1);
            let frame = SourceFrame {
                name: path.display().to_string(),
                picture: Picture::File(path.clone()),
                // Captured when due: if the pipeline held the source back, the frame is late.
                captured: Some(due.into_std()),
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    }
}

/// Reads raw RGB frames from `input` until it ends; a short last frame is reported and
/// dropped.
fn read_raw(mut input: impl Read, width: u32, height: u32, tx: &mpsc::Sender<SourceFrame>) {
    let size = width as usize * height as usize * 3;
    for n in 0u64.. {
        let mut pixels = vec![0u8; size];
        match read_full(&mut input, &mut pixels) {
            Ok(0) => return,
            Ok(got) if got < size => {
                tracing::warn!(
                    got,
                    size,
                    "stdin ended inside a frame; its {got} bytes are ignored"
                );
                return;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "reading frames from stdin");
                return;
            }
        }
        let Some(image) = RgbImage::from_raw(width, height, pixels) else {
            return;
        };
        let frame = SourceFrame {
            name: format!("stdin#{n}"),
            picture: Picture::Rgb(image),
            captured: Some(Instant::now()),
        };
        if tx.blocking_send(frame).is_err() {
            return;
        }
    }
}

/// Fills `buffer` unless the input ends first; returns the bytes read.
fn read_full(input: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cleave-sources-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn png(path: &Path) {
        RgbImage::from_pixel(4, 4, image::Rgb([10, 20, 30]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn raw_frames_are_cut_at_the_frame_size_and_a_short_tail_is_dropped() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut bytes: Vec<u8> = (0..2 * 2 * 2 * 3).map(|i| i as u8).collect();
        bytes.extend([1, 2, 3]);
        read_raw(bytes.as_slice(), 2, 2, &tx);
        drop(tx);
        let first = rx.blocking_recv().unwrap();
        let second = rx.blocking_recv().unwrap();
        assert!(rx.blocking_recv().is_none());
        assert_eq!(first.name, "stdin#0");
        let Picture::Rgb(image) = second.picture else {
            panic!("rgb expected")
        };
        assert_eq!(image.get_pixel(0, 0).0, [12, 13, 14]);
    }

    #[tokio::test]
    async fn a_watched_folder_yields_what_is_there_then_new_files_once_complete() {
        let dir = temp_dir("watch");
        png(&dir.join("b.png"));
        png(&dir.join("a.png"));
        std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
        let mut rx = start(
            SourceSpec::Watch {
                dir: dir.clone(),
                poll: Duration::from_millis(20),
            },
            4,
        )
        .unwrap();
        let name = |f: SourceFrame| Path::new(&f.name).file_name().unwrap().to_owned();
        assert_eq!(name(rx.recv().await.unwrap()), "a.png");
        assert_eq!(name(rx.recv().await.unwrap()), "b.png");
        png(&dir.join("c.png"));
        let next = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        assert_eq!(name(next.unwrap()), "c.png");
        // Nothing is yielded twice.
        let again = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        assert!(again.is_err(), "{again:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_replay_stamps_each_frame_with_its_due_time_and_stops_after_its_loops() {
        let dir = temp_dir("replay");
        png(&dir.join("a.png"));
        png(&dir.join("b.png"));
        let mut rx = start(
            SourceSpec::Replay {
                dir: dir.clone(),
                fps: 50.0,
                loops: 2,
            },
            8,
        )
        .unwrap();
        let mut frames = Vec::new();
        while let Some(frame) = rx.recv().await {
            frames.push(frame);
        }
        assert_eq!(frames.len(), 4);
        let gap = frames[3].captured.unwrap() - frames[0].captured.unwrap();
        // Due times, not arrival times: exactly three intervals apart.
        assert!((gap.as_secs_f64() - 0.06).abs() < 1e-3, "{gap:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_sources_are_refused_with_the_path() {
        let missing = PathBuf::from("/nonexistent/frames");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let error = start(SourceSpec::Files(vec![missing.clone()]), 1).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/frames"), "{error}");
        let error = start(
            SourceSpec::Watch {
                dir: missing,
                poll: Duration::from_secs(1),
            },
            1,
        )
        .unwrap_err();
        assert!(error.to_string().contains("/nonexistent/frames"), "{error}");
        let error = start(
            SourceSpec::StdinRaw {
                width: 0,
                height: 4,
            },
            1,
        )
        .unwrap_err();
        assert!(error.to_string().contains("1×1"), "{error}");
    }
}
