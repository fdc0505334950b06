//! The camera source's tests that need no camera: pixel conversions, format choice, frame
//! accounting, and the errors of devices that are not there.

use super::*;

#[test]
fn bt601_maps_the_reference_colours() {
    assert_eq!(bt601(16, 128, 128), [0, 0, 0]);
    assert_eq!(bt601(235, 128, 128), [255, 255, 255]);
    assert_eq!(bt601(126, 128, 128), [128, 128, 128]);
    // Fully saturated primaries: the Y, Cb, Cr of pure red, green and blue.
    assert_eq!(bt601(81, 90, 240), [255, 0, 0]);
    assert_eq!(bt601(145, 54, 34), [0, 255, 1]);
    assert_eq!(bt601(41, 240, 110), [0, 0, 255]);
    // Out-of-range inputs clamp instead of wrapping.
    assert_eq!(bt601(0, 128, 128), [0, 0, 0]);
    assert_eq!(bt601(255, 128, 128), [255, 255, 255]);
}

#[test]
fn yuyv_pairs_share_chroma_and_row_padding_is_skipped() {
    // 2×2 image, rows of 4 bytes padded to 6: row 0 is black then white (neutral chroma),
    // row 1 is two red pixels.
    let bytes = [
        16, 128, 235, 128, 0xEE, 0xEE, //
        81, 90, 81, 240, 0xEE, 0xEE,
    ];
    let image = yuyv_to_rgb(&bytes, 2, 2, 6).unwrap();
    assert_eq!(image.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(image.get_pixel(1, 0).0, [255, 255, 255]);
    assert_eq!(image.get_pixel(0, 1).0, [255, 0, 0]);
    assert_eq!(image.get_pixel(1, 1).0, [255, 0, 0]);
    // The last row need not carry its padding; a packed frame reads the same way.
    assert!(yuyv_to_rgb(&bytes[..10], 2, 2, 6).is_ok());
    let packed = [16, 128, 235, 128, 81, 90, 81, 240];
    assert_eq!(yuyv_to_rgb(&packed, 2, 2, 0).unwrap(), image);
}

#[test]
fn short_frames_are_errors_not_panics() {
    let error = yuyv_to_rgb(&[16, 128, 235], 2, 1, 0).unwrap_err();
    assert!(error.contains("3 bytes"), "{error}");
    assert!(rgb24_to_rgb(&[1, 2, 3, 4, 5], 2, 1, 0).is_err());
    let layout = Layout {
        format: CameraFormat::Mjpeg,
        width: 2,
        height: 2,
        stride: 0,
    };
    assert!(to_rgb(layout, b"\xFF\xD8 not really a jpeg").is_err());
}

#[test]
fn rgb24_rows_are_copied_without_their_padding() {
    let bytes = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12];
    let image = rgb24_to_rgb(&bytes, 2, 2, 8).unwrap();
    assert_eq!(image.into_raw(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
}

#[test]
fn mjpeg_frames_decode_through_the_image_crate() {
    let source = RgbImage::from_pixel(16, 8, image::Rgb([200, 40, 40]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
        .encode_image(&source)
        .unwrap();
    let layout = Layout {
        format: CameraFormat::Mjpeg,
        width: 16,
        height: 8,
        stride: 0,
    };
    let image = to_rgb(layout, &jpeg).unwrap();
    assert_eq!(image.dimensions(), (16, 8));
    let [r, g, b] = image.get_pixel(3, 3).0;
    assert!(r > 180 && g < 70 && b < 70, "{r} {g} {b}");
}

#[test]
fn formats_are_chosen_by_preference_or_as_asked() {
    let mjpg_yuyv = [PixelFormat::MJPG, PixelFormat::YUYV];
    assert_eq!(
        choose_format(&mjpg_yuyv, None),
        Ok((CameraFormat::Yuyv, PixelFormat::YUYV))
    );
    assert_eq!(
        choose_format(&mjpg_yuyv, Some(CameraFormat::Mjpeg)),
        Ok((CameraFormat::Mjpeg, PixelFormat::MJPG))
    );
    assert_eq!(
        choose_format(&[PixelFormat::JPEG], None),
        Ok((CameraFormat::Mjpeg, PixelFormat::JPEG))
    );
    assert_eq!(
        choose_format(&mjpg_yuyv, Some(CameraFormat::Rgb24)),
        Err(Some(CameraFormat::Rgb24))
    );
    assert_eq!(choose_format(&[PixelFormat::BGR3], None), Err(None));
    let listed = describe(&[(PixelFormat::BGR3, "24-bit BGR 8-8-8".into())]);
    assert_eq!(listed, "BGR3 (24-bit BGR 8-8-8)");
    assert_eq!("MJPEG".parse::<CameraFormat>(), Ok(CameraFormat::Mjpeg));
    assert!("nv12".parse::<CameraFormat>().unwrap_err().contains("yuyv"));
}

#[test]
fn frames_are_numbered_dropped_when_the_channel_is_full_and_stop_when_it_closes() {
    let (tx, mut rx) = mpsc::channel(1);
    let mut tally = Tally::new();
    let start = Instant::now();
    let Offer::Send(permit, name) = tally.offer("/dev/video7", &tx, start) else {
        panic!("room for the first frame")
    };
    assert_eq!(name, "/dev/video7#0");
    permit.send(SourceFrame {
        name,
        picture: Picture::Rgb(RgbImage::new(1, 1)),
        captured: Some(start),
    });
    // Full: the next two are dropped, not waited for.
    assert!(matches!(
        tally.offer("/dev/video7", &tx, start),
        Offer::Dropped
    ));
    assert!(matches!(
        tally.offer("/dev/video7", &tx, start),
        Offer::Dropped
    ));
    assert_eq!(rx.try_recv().unwrap().name, "/dev/video7#0");
    // The numbering counts the dropped frames, so the gap shows.
    let Offer::Send(_, name) = tally.offer("/dev/video7", &tx, start) else {
        panic!("room again")
    };
    assert_eq!(name, "/dev/video7#3");
    drop(rx);
    assert!(matches!(
        tally.offer("/dev/video7", &tx, start),
        Offer::Closed
    ));
    assert_eq!(tally.stats.captured, 5);
    assert_eq!(tally.stats.dropped, 2);
}

#[test]
fn drops_are_logged_at_once_then_summarised_every_few_seconds() {
    let mut tally = Tally::new();
    let t0 = Instant::now();
    assert_eq!(tally.drop_to_log(t0), Some(1));
    assert_eq!(tally.drop_to_log(t0 + Duration::from_secs(1)), None);
    assert_eq!(tally.drop_to_log(t0 + Duration::from_secs(2)), None);
    assert_eq!(tally.drop_to_log(t0 + DROP_LOG_EVERY), Some(3));
    assert_eq!(tally.drop_to_log(t0 + DROP_LOG_EVERY), None);
}

#[test]
fn bad_specs_and_missing_or_wrong_devices_are_clear_errors() {
    let spec = |device: &str| CameraSpec {
        device: PathBuf::from(device),
        width: 640,
        height: 480,
        fps: None,
        format: None,
    };
    let (tx, _rx) = mpsc::channel(1);
    let error = start_camera(spec("/dev/video99"), tx.clone()).unwrap_err();
    assert!(
        matches!(error.problem, CameraProblem::NoSuchDevice),
        "{error}"
    );
    assert!(error.to_string().contains("/dev/video99"), "{error}");
    assert!(error.to_string().contains("no such device"), "{error}");
    // A character device that is not V4L2 answers the capability query with ENOTTY.
    let error = start_camera(spec("/dev/null"), tx.clone()).unwrap_err();
    assert!(matches!(error.problem, CameraProblem::NotV4l2), "{error}");
    let head: HeadError = error.into();
    assert_eq!(head.to_string(), "/dev/null: not a V4L2 device");
    let error = start_camera(
        CameraSpec {
            width: 0,
            ..spec("/dev/video0")
        },
        tx.clone(),
    )
    .unwrap_err();
    assert!(error.to_string().contains("0x480"), "{error}");
    let error = start_camera(
        CameraSpec {
            fps: Some(f64::NAN),
            ..spec("/dev/video0")
        },
        tx,
    )
    .unwrap_err();
    assert!(error.to_string().contains("frames per second"), "{error}");
    // Permission and busy errors cannot be provoked without a device (and as root);
    // their mapping is checked on the errno.
    let denied = io::Error::from(io::ErrorKind::PermissionDenied);
    assert!(matches!(
        problem("opening", denied),
        CameraProblem::PermissionDenied
    ));
    let busy = io::Error::from_raw_os_error(EBUSY);
    assert!(matches!(
        problem("setting the pixel format", busy),
        CameraProblem::Busy
    ));
    let gone = io::Error::from_raw_os_error(ENODEV);
    assert!(matches!(
        problem("dequeuing a frame", gone),
        CameraProblem::NoSuchDevice
    ));
}

/// A real capture, when this machine has a camera: `CLEAVE_TEST_CAMERA=/dev/video0`
/// (optionally `CLEAVE_TEST_CAMERA_FORMAT=yuyv`). Without one it says so and skips, unless
/// `CLEAVE_REQUIRE_CAMERA=1` makes that a failure.
#[test]
fn captures_frames_from_a_real_camera_when_one_is_named() {
    let Some(device) = std::env::var_os("CLEAVE_TEST_CAMERA") else {
        assert_ne!(
            std::env::var("CLEAVE_REQUIRE_CAMERA").as_deref(),
            Ok("1"),
            "CLEAVE_REQUIRE_CAMERA=1 but no CLEAVE_TEST_CAMERA device is named"
        );
        eprintln!("skipped: no camera here (set CLEAVE_TEST_CAMERA=/dev/videoN to run)");
        return;
    };
    let (tx, mut rx) = mpsc::channel(2);
    let capture = start_camera(
        CameraSpec {
            device: PathBuf::from(&device),
            width: 640,
            height: 480,
            fps: None,
            format: std::env::var("CLEAVE_TEST_CAMERA_FORMAT")
                .ok()
                .map(|f| f.parse().unwrap()),
        },
        tx,
    )
    .unwrap();
    for _ in 0..5 {
        let frame = rx.blocking_recv().expect("a frame from the camera");
        let Picture::Rgb(image) = frame.picture else {
            panic!("rgb expected")
        };
        assert_eq!(image.dimensions(), (capture.width, capture.height));
        assert!(frame.captured.is_some());
    }
    drop(rx);
    let stats = capture.thread.join().unwrap().unwrap();
    assert!(stats.sent >= 5, "{stats:?}");
    eprintln!(
        "captured from {}: {stats:?} as {}",
        device.to_string_lossy(),
        capture.format
    );
}
