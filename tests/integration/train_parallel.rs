//! Data-parallel training on the CPU backend (issue 13), as a user runs it: `train
//! --num_processes 2` (the program launches itself twice, the processes sum their gradients over
//! TCP), two launchers on 127.0.0.1 with `--num_machines 2`, and processes started by an outside
//! launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one of which is killed; and the
//! window's "Use all N GPUs", whose ranks are threads of the training thread.
//!
//! The acceptance: N processes of batch b reach the weights of one process of batch N·b (float32
//! tolerance), with and without accumulation and through an epoch's short last batch; a
//! checkpoint written by two processes resumes on one; a killed rank ends the run with a message
//! naming it and nothing corrupt, and `--resume_from_checkpoint latest` continues.

use crate::common;
use crate::train_dataset;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use instruct_pix2pix::train::checkpoint::{list_checkpoints, load_checkpoint};
use instruct_pix2pix::train::metrics::read_metrics;
use instruct_pix2pix::worker::training::{TrainRequest, TrainingEvent, TrainingHandle};

/// A port nothing listens on (the test binds it, reads it and lets it go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn dataset(dir: &Path, count: usize) -> PathBuf {
    let data = dir.join("data");
    train_dataset::write_invert_dataset(&data, count, 32, 5);
    data
}

/// `train` on `data` into `out` at 32², with dropout and flips (so the per-example draws and the
/// batch's flips are exercised), plus `extra`.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let flags = [
        "--resolution",
        "32",
        "--lr_warmup_steps",
        "0",
        "--learning_rate",
        "1e-3",
        // Adam divides by the gradient's own size: a gradient that is zero but for rounding
        // would turn rounding into full steps; an epsilon above that noise compares gradients.
        "--adam_epsilon",
        "1e-4",
        "--conditioning_dropout_prob",
        "0.3",
        "--random_flip",
        "--seed",
        "7",
        "--device",
        "cpu",
        "--report_to",
        "none",
        "--ddp_timeout",
        "60",
    ];
    common::train_args(data, out, &[&flags[..], extra].concat())
}

/// [`train_args`] for two processes of batch 2 launched by `--num_processes 2` on a free port.
fn two_processes_of_batch_2(data: &Path, out: &Path) -> Vec<String> {
    let port = free_port().to_string();
    train_args(
        data,
        out,
        &[
            "--train_batch_size",
            "2",
            "--num_processes",
            "2",
            "--main_process_port",
            &port,
        ],
    )
}

fn run(args: &[String]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run(home.path(), &args)
}

fn final_unet(out: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        out.join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The largest difference between two trained UNets, and the largest change training made to
/// the base model's weights (the scale the difference is judged against).
fn weight_difference(a: &Path, b: &Path) -> (f32, f32) {
    let base = final_unet(&common::fixture_pipeline("sd1-tiny"));
    let (a, b) = (final_unet(a), final_unet(b));
    assert_eq!(a.len(), b.len());
    let mut difference = 0f32;
    let mut moved = 0f32;
    for (name, ta) in &a {
        difference = difference.max(max_abs(ta, &b[name]));
        moved = moved.max(max_abs(ta, &base[name]));
    }
    (difference, moved)
}

/// The root mean square, over every UNet weight, of how far `a`'s final weights are from `b`'s,
/// and of how far `a`'s moved from the base model's.
fn rms_weight_difference(a: &Path, b: &Path) -> (f64, f64) {
    let base = final_unet(&common::fixture_pipeline("sd1-tiny"));
    let (a, b) = (final_unet(a), final_unet(b));
    let squares = |x: &Tensor, y: &Tensor| -> f64 {
        let d = (x - y).unwrap().to_dtype(candle_core::DType::F64).unwrap();
        d.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (mut difference, mut moved, mut count) = (0f64, 0f64, 0usize);
    for (name, ta) in &a {
        difference += squares(ta, &b[name]);
        moved += squares(ta, &base[name]);
        count += ta.elem_count();
    }
    (
        (difference / count as f64).sqrt(),
        (moved / count as f64).sqrt(),
    )
}

fn losses(out: &Path) -> Vec<f64> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|m| m.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

/// One process of batch 4 and two processes of batch 2 (launched by `--num_processes 2`) with
/// `extra`: the same losses and the same weights to float32 tolerance.
fn two_processes_match_one(examples: usize, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), examples);
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let mut single = train_args(&data, &one, &["--train_batch_size", "4"]);
    single.extend(extra.iter().map(|s| s.to_string()));
    let output = run(&single);
    assert!(output.status.success(), "{}", common::stderr(&output));

    let mut parallel = two_processes_of_batch_2(&data, &two);
    parallel.extend(extra.iter().map(|s| s.to_string()));
    let output = run(&parallel);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("launching 2 processes (ranks 0–1) of 2 on this machine"),
        "{stderr}"
    );
    assert!(
        stderr.contains("2 processes summing gradients over tcp: effective batch"),
        "{stderr}"
    );
    // Rank 1 writes nothing and prints no progress of its own.
    assert!(!stderr.contains("note (rank 1)"), "{stderr}");

    let (a, b) = (losses(&one), losses(&two));
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "losses {a:?} vs {b:?}"
        );
    }
    let (difference, moved) = weight_difference(&one, &two);
    assert!(moved > 1e-3, "training moved the weights by only {moved}");
    assert!(
        difference <= 1e-3 * moved,
        "weights differ by {difference} (training moved them by {moved})"
    );
}

#[test]
fn two_processes_of_batch_2_reach_the_weights_of_one_process_of_batch_4() {
    // 8 examples: two full global batches per epoch.
    two_processes_match_one(8, &["--max_train_steps", "3"]);
}

#[test]
fn with_accumulation_and_a_short_last_batch_two_processes_still_match_one() {
    // 6 examples in global batches of 4: every epoch ends with a batch of 2, all on rank 0 (rank
    // 1 has none); two micro-batches per optimizer step.
    two_processes_match_one(
        6,
        &[
            "--max_train_steps",
            "3",
            "--gradient_accumulation_steps",
            "2",
        ],
    );
}

#[test]
fn a_checkpoint_written_by_two_processes_resumes_on_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 8);
    let two = dir.path().join("two");
    let flags = ["--max_train_steps", "4", "--checkpointing_steps", "2"];
    let mut args = two_processes_of_batch_2(&data, &two);
    args.extend(flags.iter().map(|s| s.to_string()));
    let output = run(&args);
    assert!(output.status.success(), "{}", common::stderr(&output));

    // The same run continued from its step-2 checkpoint by one process of batch 4.
    let one = dir.path().join("one");
    std::fs::create_dir_all(&one).unwrap();
    common::copy_dir(&two.join("checkpoint-2"), &one.join("checkpoint-2"));
    let mut args = train_args(&data, &one, &["--train_batch_size", "4"]);
    args.extend(flags.iter().map(|s| s.to_string()));
    args.extend(["--resume_from_checkpoint".into(), "latest".into()]);
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("at step 2"), "{stderr}");
    let (difference, moved) = weight_difference(&one, &two);
    assert!(
        difference <= 1e-3 * moved,
        "weights differ by {difference} (training moved them by {moved})"
    );

    // A global batch of another size cannot continue the data position: refused by name.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    common::copy_dir(&two.join("checkpoint-2"), &other.join("checkpoint-2"));
    let mut args = train_args(&data, &other, &["--train_batch_size", "2"]);
    args.extend(flags.iter().map(|s| s.to_string()));
    args.extend(["--resume_from_checkpoint".into(), "latest".into()]);
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains("batches of 4 (2 on each of 2 processes)"),
        "{stderr}"
    );
}

/// Rank `rank` of `world` started as an outside launcher (torchrun, srun) starts it.
fn spawn_rank(home: &Path, args: &[String], rank: usize, world: usize, port: u16) -> Child {
    common::program(home)
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn killing_one_rank_ends_the_run_cleanly_and_latest_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 8);
    let out = dir.path().join("out");
    let flags = [
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "400",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
    ];
    let args = train_args(&data, &out, &flags);
    let port = free_port();
    let mut zero = spawn_rank(home.path(), &args, 0, 2, port);
    let mut one = spawn_rank(home.path(), &args, 1, 2, port);
    let started = Instant::now();
    while !out.join("checkpoint-4").is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint-4 after 2 minutes"
        );
        assert!(zero.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    one.kill().unwrap();
    one.wait().unwrap();
    let killed = Instant::now();
    let output = zero.wait_with_output().unwrap();
    let stderr = common::stderr(&output);
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "rank 0 took {:?} to stop",
        killed.elapsed()
    );
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 stopped or crashed"), "{stderr}");

    // Nothing corrupt: every checkpoint loads.
    let checkpoints = list_checkpoints(&out).unwrap();
    assert!(!checkpoints.is_empty() && checkpoints.len() <= 2);
    for (_, path) in &checkpoints {
        load_checkpoint(path, &Device::Cpu).unwrap();
    }
    let last = checkpoints.last().unwrap().0;

    // `latest` continues, here with the launcher.
    let port = free_port().to_string();
    let steps = (last + 2).to_string();
    let mut args = train_args(&data, &out, &flags);
    let at = args.iter().position(|a| a == "400").unwrap();
    args[at] = steps.clone();
    args.extend(
        [
            "--resume_from_checkpoint",
            "latest",
            "--num_processes",
            "2",
            "--main_process_port",
            &port,
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("at step {last}")), "{stderr}");
    assert!(out.join(format!("checkpoint-{steps}")).is_dir());
    assert!(out.join("model_index.json").is_file());
}

#[test]
fn two_launchers_with_num_machines_2_rendezvous_and_train() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let port = free_port().to_string();
    let machine = |rank: &str| {
        let args = train_args(
            &data,
            &out,
            &[
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "2",
                "--num_processes",
                "2",
                "--num_machines",
                "2",
                "--machine_rank",
                rank,
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                &port,
            ],
        );
        common::program(home.path())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Machine 1 first: it waits for machine 0's rendezvous.
    let second = machine("1");
    std::thread::sleep(Duration::from_millis(300));
    let first = machine("0");
    for (name, child) in [("machine 0", first), ("machine 1", second)] {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{name}: {}",
            common::stderr(&output)
        );
    }
    assert!(out.join("model_index.json").is_file());
    assert_eq!(losses(&out).len(), 2);
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let args = train_args(
        &data,
        &out,
        &[
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "2",
            "--num_processes",
            "2",
            "--main_process_port",
            &port,
            "--ddp_timeout",
            "3",
        ],
    );
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("--main_process_port"), "{stderr}");
    assert!(
        stderr.contains("the run failed: rank 0 exited with status 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.join("model_index.json").exists());
    drop(taken);
}

/// Runs a window's fine-tuning request on the training thread to its end.
fn train_from_the_window(request: TrainRequest) -> (Vec<f64>, PathBuf) {
    let (handle, events) = TrainingHandle::spawn(request, std::sync::Arc::new(|| {})).unwrap();
    let mut losses = Vec::new();
    loop {
        match events.recv_timeout(Duration::from_secs(300)) {
            Ok(TrainingEvent::Step(progress)) => losses.push(progress.loss),
            Ok(TrainingEvent::Finished { model, .. }) => {
                drop(handle);
                return (losses, model);
            }
            Ok(TrainingEvent::Failed(message)) => panic!("{message}"),
            Ok(_) => {}
            Err(e) => panic!("no news from the training thread: {e}"),
        }
    }
}

/// The window's "Use all N GPUs" runs the ranks as threads of the training thread (on the CPU
/// here): two ranks of batch 1 compute what one rank of batch 2 computes, and rank 0 alone
/// writes.
#[test]
fn the_window_s_ranks_as_threads_train_like_one_rank_of_twice_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let request = |name: &str, processes: usize, train_batch_size: usize| TrainRequest {
        dataset: data.clone(),
        base_model: common::fixture_pipeline("sd1-tiny").display().to_string(),
        output_dir: dir.path().join(name),
        max_train_steps: 3,
        learning_rate: 1e-3,
        train_batch_size,
        gradient_accumulation_steps: 1,
        resolution: 32,
        use_ema: false,
        checkpointing_steps: 1000,
        processes,
        ..TrainRequest::default()
    };
    let (one, one_model) = train_from_the_window(request("one", 1, 2));
    let (two, two_model) = train_from_the_window(request("two", 2, 1));
    assert_eq!(one.len(), 3);
    assert_eq!(two.len(), 3);
    // The first step starts from the same weights: the same loss to float32 rounding; the later
    // ones from weights whose sums were added in another order.
    assert!(
        (one[0] - two[0]).abs() <= 1e-5 * one[0].abs(),
        "{one:?} vs {two:?}"
    );
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "{one:?} vs {two:?}");
    }
    // The dialog keeps Adam's epsilon of 1e-8, which turns the rounding of near-zero gradients
    // into steps of up to the learning rate (the command-line tests above raise it and compare
    // to 1e-3): a few weights may differ by half a step (the largest difference was 8–15% of
    // the largest move, depending on the products' summation order), so the weights are
    // compared as a whole: their root-mean-square difference was 0.03–0.04% of how far
    // training moved them.
    let (difference, moved) = rms_weight_difference(&one_model, &two_model);
    assert!(
        moved > 1e-4,
        "training moved the weights by only {moved} (RMS)"
    );
    assert!(
        difference <= 0.01 * moved,
        "weights differ by {difference} (RMS; training moved them by {moved})"
    );
    assert_eq!(losses(&two_model).len(), 3, "rank 0 alone logs");
}
