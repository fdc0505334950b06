//! A camera as a frame source: V4L2 capture on Linux, behind the `v4l2` cargo feature.
//!
//! [`start_camera`] opens the device, checks that it captures video through streaming I/O,
//! negotiates a pixel format and a size, asks for a frame rate, and starts a capture thread
//! that hands [`SourceFrame`]s named `<device>#<n>` to the pipeline. `n` counts every frame
//! the driver gave us, so a gap in the names is a frame dropped here.
//!
//! - **Formats.** RGB24 (`RGB3`) is taken as is; YUYV 4:2:2 is converted to RGB here
//!   ([`yuyv_to_rgb`], BT.601 limited range); MJPEG (`MJPG` or `JPEG`) is decoded with the
//!   `image` crate (its decoder, zune-jpeg, supplies the standard Huffman tables that UVC
//!   cameras leave out). Without `--camera-format` the first the device offers in that order
//!   is used. Multi-planar devices are not supported and are refused by name.
//! - **Time.** `captured` is stamped when a buffer is dequeued, so a frame's deadline counts
//!   from when it left the driver.
//! - **Back-pressure.** A camera does not wait. When the pipeline is slower, a frame that
//!   finds the channel full is dropped at once (before any conversion is spent on it), counted
//!   in [`CaptureStats::dropped`] and in the `cleave_head_camera_dropped_frames_total`
//!   counter, and logged with `tracing` (the first drop at once, then at most one summary every
//!   five seconds), never queued without bound.
//! - **Stopping.** The thread ends when the receiver is dropped (checked before each dequeue,
//!   so within one frame interval), or on a device error (unplugged: `ENODEV`), which it logs and
//!   returns. Streaming is turned off and the buffers unmapped when it ends.
//! - **Thread.** Capture runs on its own named thread, not on tokio's blocking pool: the
//!   daemon caps that pool at four threads for the encoder and local runs, and a camera
//!   holds its thread for as long as it runs.
//!
//! # Why `linuxvideo`
//!
//! The workspace forbids `unsafe`, so the ioctls and `mmap` come from a crate. `v4l` (libv4l-rs)
//! is the better known one, but its default backend, `v4l2-sys-mit`, generates bindings with
//! bindgen at build time, which needs libclang on every machine that builds with
//! `--all-features` (CI included), and its other backend links the C libv4l. `linuxvideo`
//! (0BSD) calls the V4L2 ioctls from pure Rust (its dependencies: `libc`, `bitflags`, `log`,
//! `uoctl`; no build script), streams through `mmap`ped buffers, and builds here with no system
//! package. Its `log` records are not forwarded to `tracing`; this module logs what matters.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use image::RgbImage;
use linuxvideo::format::{PixFormat, PixelFormat};
use linuxvideo::stream::ReadStream;
use linuxvideo::{BufType, CapabilityFlags, Device, Fract};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::HeadError;
use crate::sources::{Picture, SourceFrame};

/// Counter of frames dropped because the pipeline was busy.
pub const DROPPED_FRAMES: &str = "cleave_head_camera_dropped_frames_total";

/// How often, at most, drops are logged after the first.
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);

/// `EIO` from a dequeue in a row before the capture gives up (drivers use it for a lost
/// signal, which may pass).
const MAX_IO_ERRORS: u32 = 5;

// Linux errno values that `std::io::ErrorKind` does not name on stable.
const ENOTTY: i32 = 25;
const ENODEV: i32 = 19;
const ENXIO: i32 = 6;
const EIO: i32 = 5;
const EBUSY: i32 = 16;

/// A pixel encoding this source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraFormat {
    /// `RGB3`: 3 bytes a pixel, red first.
    Rgb24,
    /// `YUYV`: 4:2:2, `Y0 U Y1 V` for each pair of pixels.
    Yuyv,
    /// `MJPG` or `JPEG`: each frame a JPEG image.
    Mjpeg,
}

impl CameraFormat {
    /// The order tried when none is asked for: no conversion, a cheap one, a decode.
    pub const PREFERENCE: [CameraFormat; 3] = [Self::Rgb24, Self::Yuyv, Self::Mjpeg];

    /// The flag's spelling: `rgb24`, `yuyv`, `mjpeg`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rgb24 => "rgb24",
            Self::Yuyv => "yuyv",
            Self::Mjpeg => "mjpeg",
        }
    }

    fn fourccs(self) -> &'static [PixelFormat] {
        match self {
            Self::Rgb24 => &[PixelFormat::RGB3],
            Self::Yuyv => &[PixelFormat::YUYV],
            Self::Mjpeg => &[PixelFormat::MJPG, PixelFormat::JPEG],
        }
    }

    fn of(fourcc: PixelFormat) -> Option<Self> {
        Self::PREFERENCE
            .into_iter()
            .find(|f| f.fourccs().contains(&fourcc))
    }
}

impl FromStr for CameraFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::PREFERENCE
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(text.trim()))
            .ok_or_else(|| format!("unknown camera format {text:?} (rgb24, yuyv, mjpeg)"))
    }
}

impl std::fmt::Display for CameraFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to capture.
#[derive(Debug, Clone)]
pub struct CameraSpec {
    /// The device node, e.g. `/dev/video0`.
    pub device: PathBuf,
    /// Pixels per row asked for; the driver picks the nearest size it has.
    pub width: u32,
    /// Rows asked for.
    pub height: u32,
    /// Frames per second asked of the driver; `None` keeps the device's rate. A driver that
    /// cannot set it is logged and the device's rate kept.
    pub fps: Option<f64>,
    /// The pixel encoding; `None` takes the first of [`CameraFormat::PREFERENCE`] offered.
    pub format: Option<CameraFormat>,
}

/// What was wrong with a camera, and which one.
#[derive(Debug, thiserror::Error)]
#[error("camera {device}: {problem}")]
pub struct CameraError {
    /// The device node.
    pub device: String,
    /// What is wrong.
    pub problem: CameraProblem,
}

/// What can go wrong with a camera.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CameraProblem {
    /// The node does not exist, or its device is gone.
    #[error("no such device (is the camera plugged in? `ls /dev/video*` lists V4L2 devices)")]
    NoSuchDevice,
    /// The node cannot be opened for reading and writing by this user.
    #[error("permission denied (add the user to the `video` group)")]
    PermissionDenied,
    /// The file exists but does not answer V4L2's capability query.
    #[error("not a V4L2 device")]
    NotV4l2,
    /// A V4L2 device that does not capture video into single-plane buffers by streaming.
    #[error(
        "{card:?} is not a video capture device with streaming I/O (it offers {capabilities}); \
         a UVC camera's second node is often metadata only, and multi-planar capture is not \
         supported"
    )]
    NotCapture {
        /// The device's name.
        card: String,
        /// Its capability flags.
        capabilities: String,
    },
    /// None of the formats the device offers can be read here.
    #[error(
        "{card:?} offers no pixel format this source reads (rgb24, yuyv, mjpeg); it offers {offered}"
    )]
    NoSupportedFormat {
        /// The device's name.
        card: String,
        /// What it offers: fourcc and description.
        offered: String,
    },
    /// The format asked for is not offered.
    #[error("{card:?} does not offer {wanted}; it offers {offered}")]
    FormatNotOffered {
        /// The device's name.
        card: String,
        /// The format asked for.
        wanted: CameraFormat,
        /// What it offers.
        offered: String,
    },
    /// Another program holds the device.
    #[error("device busy (another program is capturing from it)")]
    Busy,
    /// The spec itself is unusable.
    #[error("{0}")]
    Spec(String),
    /// Any other failure of a V4L2 call.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl From<CameraError> for HeadError {
    fn from(error: CameraError) -> Self {
        HeadError::Input {
            path: error.device,
            reason: error.problem.to_string(),
        }
    }
}

/// What a capture did, returned by its thread when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Frames dequeued from the driver.
    pub captured: u64,
    /// Frames handed to the pipeline.
    pub sent: u64,
    /// Frames dropped because the pipeline's channel was full.
    pub dropped: u64,
    /// Frames that could not be read: flagged bad by the driver, short, or an undecodable
    /// JPEG.
    pub unreadable: u64,
}

/// A started capture.
#[derive(Debug)]
pub struct Capture {
    /// The pixel encoding in use.
    pub format: CameraFormat,
    /// The frame width the driver chose.
    pub width: u32,
    /// The frame height the driver chose.
    pub height: u32,
    /// The frame rate the driver set, when one was asked for and it answered; `None` keeps the
    /// device's own rate.
    pub fps: Option<f64>,
    /// The capture thread; it ends when the receiver is dropped or the device fails.
    pub thread: JoinHandle<Result<CaptureStats, CameraError>>,
}

/// Opens and configures `spec.device` and starts capturing into `tx` on a thread of its own.
///
/// Frames are offered with no waiting: one that finds the channel full is dropped and counted.
///
/// # Errors
///
/// A [`CameraError`] naming the device: no such device, permission denied, not a V4L2
/// device, not a capture device, no supported pixel format (with the list the device offers),
/// busy, a zero size or a bad frame rate.
pub fn start_camera(
    spec: CameraSpec,
    tx: mpsc::Sender<SourceFrame>,
) -> Result<Capture, CameraError> {
    let name = spec.device.display().to_string();
    let fail = |problem| CameraError {
        device: name.clone(),
        problem,
    };
    check_spec(&spec).map_err(|reason| fail(CameraProblem::Spec(reason)))?;
    let (stream, layout, fps) = open(&spec).map_err(fail)?;
    tracing::info!(
        device = %name,
        format = %layout.format,
        width = layout.width,
        height = layout.height,
        fps,
        "camera streaming"
    );
    let device = name.clone();
    let thread = std::thread::Builder::new()
        .name("cleave-camera".into())
        .spawn(move || {
            let result = capture(stream, layout, &device, &tx);
            match &result {
                Ok(stats) => tracing::info!(device, ?stats, "camera stopped"),
                Err(error) => tracing::error!(%error, "camera capture failed"),
            }
            result
        })
        .map_err(|source| {
            fail(CameraProblem::Io {
                action: "starting the capture thread",
                source,
            })
        })?;
    Ok(Capture {
        format: layout.format,
        width: layout.width,
        height: layout.height,
        fps,
        thread,
    })
}

fn check_spec(spec: &CameraSpec) -> Result<(), String> {
    if !(1..=16384).contains(&spec.width) || !(1..=16384).contains(&spec.height) {
        return Err(format!(
            "frame size must be 1 to 16384 pixels a side, not {}x{}",
            spec.width, spec.height
        ));
    }
    if let Some(fps) = spec.fps
        && !(fps.is_finite() && (0.01..=1000.0).contains(&fps))
    {
        return Err(format!(
            "camera rate must be 0.01 to 1000 frames per second, not {fps}"
        ));
    }
    Ok(())
}

/// Where the pixels of a dequeued buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    format: CameraFormat,
    width: u32,
    height: u32,
    /// Bytes from one row to the next (raw formats); 0 when the driver leaves it unset.
    stride: usize,
}

/// Turns an `io::Error` from a V4L2 call into what a user can act on.
fn problem(action: &'static str, source: io::Error) -> CameraProblem {
    match (source.kind(), source.raw_os_error()) {
        (io::ErrorKind::NotFound, _) | (_, Some(ENODEV | ENXIO)) => CameraProblem::NoSuchDevice,
        (io::ErrorKind::PermissionDenied, _) => CameraProblem::PermissionDenied,
        (_, Some(ENOTTY)) => CameraProblem::NotV4l2,
        (_, Some(EBUSY)) => CameraProblem::Busy,
        _ => CameraProblem::Io { action, source },
    }
}

fn open(spec: &CameraSpec) -> Result<(ReadStream, Layout, Option<f64>), CameraProblem> {
    let device = Device::open(&spec.device).map_err(|e| problem("opening", e))?;
    let caps = device
        .capabilities()
        .map_err(|e| problem("querying capabilities", e))?;
    let card = caps.card().to_string();
    let flags = caps.device_capabilities();
    if !flags.contains(CapabilityFlags::VIDEO_CAPTURE | CapabilityFlags::STREAMING) {
        return Err(CameraProblem::NotCapture {
            card,
            capabilities: format!("{flags:?}"),
        });
    }
    let mut offered = Vec::new();
    for desc in device.formats(BufType::VIDEO_CAPTURE) {
        let desc = desc.map_err(|e| problem("listing pixel formats", e))?;
        offered.push((desc.pixel_format(), desc.description().to_string()));
    }
    let fourccs: Vec<PixelFormat> = offered.iter().map(|(f, _)| *f).collect();
    let listed = || describe(&offered);
    let (format, fourcc) = match choose_format(&fourccs, spec.format) {
        Ok(chosen) => chosen,
        Err(Some(wanted)) => {
            return Err(CameraProblem::FormatNotOffered {
                card,
                wanted,
                offered: listed(),
            });
        }
        Err(None) => {
            return Err(CameraProblem::NoSupportedFormat {
                card,
                offered: listed(),
            });
        }
    };
    let capture = device
        .video_capture(PixFormat::new(spec.width, spec.height, fourcc))
        .map_err(|e| problem("setting the pixel format", e))?;
    let got = capture.format();
    // The driver may answer with another format than asked; one we read is still fine.
    let Some(format) = CameraFormat::of(got.pixel_format()) else {
        return Err(CameraProblem::NoSupportedFormat {
            card,
            offered: format!(
                "{} (the driver's choice instead of {format})",
                got.pixel_format()
            ),
        });
    };
    let layout = Layout {
        format,
        width: got.width(),
        height: got.height(),
        stride: got.bytes_per_line() as usize,
    };
    let fps = spec.fps.and_then(|fps| {
        let asked = Fract::new(1000, ((fps * 1000.0).round() as u32).max(1));
        match capture.set_frame_interval(asked) {
            Ok(interval) if interval.numerator() > 0 => {
                Some(f64::from(interval.denominator()) / f64::from(interval.numerator()))
            }
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(device = %spec.device.display(), %error, fps,
                    "the driver cannot set the frame rate; keeping the device's");
                None
            }
        }
    });
    let stream = capture
        .into_stream()
        .map_err(|e| problem("starting the stream (mmap buffers)", e))?;
    Ok((stream, layout, fps))
}

/// The format to use: the one asked for, or the first of the preference offered.
/// `Err(Some(wanted))` when the one asked for is not offered, `Err(None)` when none is.
fn choose_format(
    offered: &[PixelFormat],
    wanted: Option<CameraFormat>,
) -> Result<(CameraFormat, PixelFormat), Option<CameraFormat>> {
    let candidates: &[CameraFormat] = match &wanted {
        Some(wanted) => std::slice::from_ref(wanted),
        None => &CameraFormat::PREFERENCE,
    };
    candidates
        .iter()
        .find_map(|format| {
            let fourcc = format.fourccs().iter().find(|f| offered.contains(f))?;
            Some((*format, *fourcc))
        })
        .ok_or(wanted)
}

fn describe(offered: &[(PixelFormat, String)]) -> String {
    if offered.is_empty() {
        return "no formats at all".into();
    }
    offered
        .iter()
        .map(|(fourcc, text)| format!("{fourcc} ({text})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts frames and decides, without waiting, whether each one goes to the pipeline.
struct Tally {
    stats: CaptureStats,
    /// Drops not yet logged.
    unlogged: u64,
    last_log: Option<Instant>,
}

/// What became of one dequeued frame.
enum Offer<'a> {
    /// Room for it: send it with the permit under this name.
    Send(mpsc::Permit<'a, SourceFrame>, String),
    /// The channel was full; it is dropped (and counted).
    Dropped,
    /// The receiver is gone: stop.
    Closed,
}

impl Tally {
    fn new() -> Self {
        Self {
            stats: CaptureStats::default(),
            unlogged: 0,
            last_log: None,
        }
    }

    /// A frame was dequeued at `now`: numbers it and reserves room for it if there is any.
    fn offer<'a>(
        &mut self,
        device: &str,
        tx: &'a mpsc::Sender<SourceFrame>,
        now: Instant,
    ) -> Offer<'a> {
        let n = self.stats.captured;
        self.stats.captured += 1;
        match tx.try_reserve() {
            Ok(permit) => Offer::Send(permit, format!("{device}#{n}")),
            Err(TrySendError::Closed(())) => Offer::Closed,
            Err(TrySendError::Full(())) => {
                self.stats.dropped += 1;
                metrics::counter!(DROPPED_FRAMES).increment(1);
                if let Some(count) = self.drop_to_log(now) {
                    tracing::warn!(
                        device,
                        dropped = count,
                        total_dropped = self.stats.dropped,
                        captured = self.stats.captured,
                        "the pipeline is slower than the camera; frames dropped"
                    );
                }
                Offer::Dropped
            }
        }
    }

    /// Counts a drop; returns how many to log now (the first at once, then at most one
    /// summary per [`DROP_LOG_EVERY`]).
    fn drop_to_log(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last_log
            .is_none_or(|last| now.saturating_duration_since(last) >= DROP_LOG_EVERY);
        if !due {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// What the dequeue callback saw.
enum Dequeued<'a> {
    Copied(mpsc::Permit<'a, SourceFrame>, String, Instant),
    Flagged,
    Dropped,
    Closed,
}

fn capture(
    mut stream: ReadStream,
    layout: Layout,
    device: &str,
    tx: &mpsc::Sender<SourceFrame>,
) -> Result<CaptureStats, CameraError> {
    let mut tally = Tally::new();
    // The buffer goes back to the driver as soon as its bytes are copied out.
    let mut bytes: Vec<u8> = Vec::new();
    let mut io_errors = 0;
    while !tx.is_closed() {
        let dequeued = stream.dequeue(|buffer| {
            let now = Instant::now();
            let offer = tally.offer(device, tx, now);
            Ok(match offer {
                Offer::Closed => Dequeued::Closed,
                Offer::Dropped => Dequeued::Dropped,
                Offer::Send(..) if buffer.is_error() => Dequeued::Flagged,
                Offer::Send(permit, name) => {
                    bytes.clear();
                    bytes.extend_from_slice(&buffer[..]);
                    Dequeued::Copied(permit, name, now)
                }
            })
        });
        match dequeued {
            Ok(Dequeued::Copied(permit, name, captured)) => {
                io_errors = 0;
                match to_rgb(layout, &bytes) {
                    Ok(image) => {
                        permit.send(SourceFrame {
                            name,
                            picture: Picture::Rgb(image),
                            captured: Some(captured),
                        });
                        tally.stats.sent += 1;
                    }
                    Err(reason) => {
                        tally.stats.unreadable += 1;
                        tracing::warn!(
                            device,
                            frame = name,
                            reason,
                            "unreadable camera frame skipped"
                        );
                    }
                }
            }
            Ok(Dequeued::Flagged) => {
                tally.stats.unreadable += 1;
                tracing::debug!(device, "the driver flagged a frame as corrupt; skipped");
            }
            Ok(Dequeued::Dropped) => io_errors = 0,
            Ok(Dequeued::Closed) => break,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.raw_os_error() == Some(EIO) && io_errors < MAX_IO_ERRORS => {
                io_errors += 1;
                tracing::warn!(device, %error, "camera reported an I/O error; retrying");
            }
            Err(error) => {
                return Err(CameraError {
                    device: device.to_string(),
                    problem: problem("dequeuing a frame", error),
                });
            }
        }
    }
    Ok(tally.stats)
}

/// Decodes one buffer of `layout` into RGB.
fn to_rgb(layout: Layout, bytes: &[u8]) -> Result<RgbImage, String> {
    match layout.format {
        CameraFormat::Rgb24 => rgb24_to_rgb(bytes, layout.width, layout.height, layout.stride),
        CameraFormat::Yuyv => yuyv_to_rgb(bytes, layout.width, layout.height, layout.stride),
        CameraFormat::Mjpeg => image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
            .map(|image| image.into_rgb8())
            .map_err(|e| format!("MJPEG frame of {} bytes: {e}", bytes.len())),
    }
}

/// The rows of a raw frame: `row` bytes each, `stride` apart (0: packed).
fn rows(
    bytes: &[u8],
    height: u32,
    row: usize,
    stride: usize,
) -> Result<impl Iterator<Item = &[u8]>, String> {
    let stride = if stride < row { row } else { stride };
    let height = height as usize;
    let need = stride * height.saturating_sub(1) + row;
    if height == 0 || bytes.len() < need {
        return Err(format!(
            "frame holds {} bytes, {height} rows of {row} bytes {stride} apart need {need}",
            bytes.len()
        ));
    }
    Ok(bytes.chunks(stride).take(height).map(move |r| &r[..row]))
}

/// Copies an RGB24 frame whose rows are `stride` bytes apart (0: packed).
fn rgb24_to_rgb(bytes: &[u8], width: u32, height: u32, stride: usize) -> Result<RgbImage, String> {
    let row = width as usize * 3;
    let mut pixels = Vec::with_capacity(row * height as usize);
    for line in rows(bytes, height, row, stride)? {
        pixels.extend_from_slice(line);
    }
    RgbImage::from_raw(width, height, pixels).ok_or_else(|| "frame size overflows".to_string())
}

/// Converts a YUYV 4:2:2 frame to RGB. Each pair of pixels is stored `Y0 U Y1 V` and shares
/// `U` and `V`; rows are `stride` bytes apart (0: packed).
///
/// The conversion is ITU-R BT.601 with limited ("studio") range, which is what UVC cameras
/// send: with `C = Y − 16`, `D = U − 128`, `E = V − 128`,
///
/// ```text
/// R = 1.164·C           + 1.596·E
/// G = 1.164·C − 0.392·D − 0.813·E
/// B = 1.164·C + 2.017·D
/// ```
///
/// computed in 8-bit fixed point as `R = (298·C + 409·E + 128) >> 8`,
/// `G = (298·C − 100·D − 208·E + 128) >> 8`, `B = (298·C + 516·D + 128) >> 8`, each clamped
/// to 0..=255. Black is `Y = 16`, white `Y = 235`.
///
/// # Errors
///
/// A message when `bytes` is too short for the frame.
pub fn yuyv_to_rgb(
    bytes: &[u8],
    width: u32,
    height: u32,
    stride: usize,
) -> Result<RgbImage, String> {
    let row = (width as usize).div_ceil(2) * 4;
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for line in rows(bytes, height, row, stride)? {
        for x in 0..width as usize {
            let pair = &line[x / 2 * 4..x / 2 * 4 + 4];
            let y = pair[if x % 2 == 0 { 0 } else { 2 }];
            pixels.extend_from_slice(&bt601(y, pair[1], pair[3]));
        }
    }
    RgbImage::from_raw(width, height, pixels).ok_or_else(|| "frame size overflows".to_string())
}

/// One BT.601 limited-range YCbCr pixel to RGB (see [`yuyv_to_rgb`]).
fn bt601(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = i32::from(y) - 16;
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let clamp = |x: i32| (x >> 8).clamp(0, 255) as u8;
    [
        clamp(298 * c + 409 * e + 128),
        clamp(298 * c - 100 * d - 208 * e + 128),
        clamp(298 * c + 516 * d + 128),
    ]
}

#[cfg(test)]
mod tests;
