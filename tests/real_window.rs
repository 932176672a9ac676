//! The real window on a real X server: starts Xvfb, runs the program with no subcommand on the
//! fixture model with `--generate --screenshot`, and checks that the window came up, rendered an
//! edit and wrote its screenshot (kept as a CI artifact under `target/ci-artifacts/`).
//!
//! Needs `Xvfb` and a Vulkan or GL driver (Mesa's lavapipe / llvmpipe). Where Xvfb is missing the
//! test says so and passes, unless `IP2P_REQUIRE_WINDOW=1` (set by `.ci/run`) makes it fail.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Xvfb {
    child: Child,
    display: String,
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_xvfb() -> Option<Xvfb> {
    let found = Command::new("Xvfb")
        .arg("-help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        return None;
    }
    // A display number of our own, away from any a developer runs.
    let number = 90 + std::process::id() % 100;
    let display = format!(":{number}");
    let child = Command::new("Xvfb")
        .args([
            display.as_str(),
            "-screen",
            "0",
            "1400x1000x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb starts");
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{number}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "Xvfb did not come up on {display}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Xvfb { child, display })
}

fn artifacts() -> PathBuf {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("ci-artifacts");
    std::fs::create_dir_all(&folder).unwrap();
    folder
}

#[test]
fn the_window_comes_up_edits_and_takes_a_screenshot() {
    let Some(xvfb) = start_xvfb() else {
        assert!(
            std::env::var("IP2P_REQUIRE_WINDOW").as_deref() != Ok("1"),
            "Xvfb is not installed but IP2P_REQUIRE_WINDOW=1"
        );
        eprintln!("skipped: Xvfb is not installed (apt-get install xvfb mesa-vulkan-drivers)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let screenshot = work.path().join("window.png");
    let stats = work.path().join("frames.json");
    let case = common::fixtures().join("edits").join("sd1-ancestral-seed");
    let hf_home = work.path().join("hf");
    let mut child = common::program(&hf_home)
        .env("DISPLAY", &xvfb.display)
        .env_remove("WAYLAND_DISPLAY")
        .env("INSTRUCT_PIX2PIX_CONFIG_DIR", work.path().join("config"))
        .arg(case.join("input.png"))
        .args(["--model"])
        .arg(common::fixture_pipeline("sd1-tiny-ancestral"))
        .args(["--prompt", "make it snowy", "--generate", "--screenshot"])
        .arg(&screenshot)
        .arg("--exit-after-screenshot")
        .arg("--frame-stats")
        .arg(&stats)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the program starts");

    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the window did not finish within 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        status.success(),
        "exit {status}\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("screenshot written"),
        "stdout: {stdout}\nstderr: {stderr}"
    );

    let shot = image::open(&screenshot)
        .expect("the screenshot is a PNG")
        .to_rgb8();
    let (width, height) = shot.dimensions();
    assert!(width >= 640 && height >= 420, "window of {width}×{height}");
    let first = shot.get_pixel(0, 0);
    let distinct = shot.pixels().filter(|p| *p != first).count();
    assert!(
        distinct > (width * height / 20) as usize,
        "the screenshot is nearly blank"
    );

    let frames: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(frames["frames"].as_u64().unwrap() > 2, "{frames}");
    assert!(
        frames["frames_during_edit"].as_u64().unwrap() >= 1,
        "{frames}"
    );

    let kept = artifacts().join("window.png");
    std::fs::copy(&screenshot, &kept).unwrap();
    // A small copy for CI's log.
    let thumb_height = height * 400 / width;
    image::imageops::thumbnail(&shot, 400, thumb_height)
        .save(artifacts().join("window-thumb.png"))
        .unwrap();
    std::fs::copy(&stats, artifacts().join("window-frames.json")).unwrap();
    let mut log = std::io::stderr();
    let _ = writeln!(
        log,
        "real window: {width}×{height} screenshot at {} (frames: {frames})",
        kept.display()
    );
}
