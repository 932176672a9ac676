//! `train --multi_gpu` / `--num_processes N` / `--num_machines M`: the launcher, as
//! `accelerate launch` is one. It starts one training process per GPU (or per `--num_processes`
//! on the CPU) on this machine by running this program again with the same flags and the
//! variables an outside launcher would set (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), then watches them: when one fails, the others are given time to stop on
//! their own (they notice the closed connection) and are then ended; the launcher's exit status
//! is the run's.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::sigint;
use super::train::TrainArgs;
use crate::train::distributed::{
    DEFAULT_MASTER_PORT, LOCAL_RANK_VAR, MASTER_ADDR_VAR, MASTER_PORT_VAR, RANK_VAR, WORLD_SIZE_VAR,
};

/// Set in the processes the launcher starts (they never launch again).
pub const LAUNCHED_VAR: &str = "INSTRUCT_PIX2PIX_LAUNCHED";
/// The GPU ordinal the launcher gives a process (`--gpu_ids`).
pub const CUDA_DEVICE_VAR: &str = "INSTRUCT_PIX2PIX_CUDA_DEVICE";
/// How long the other processes get to stop on their own after one failed.
const GRACE: Duration = Duration::from_secs(20);

/// Whether these flags ask for several processes (and this process is not one of them).
pub fn wants_launch(args: &TrainArgs) -> bool {
    std::env::var_os(LAUNCHED_VAR).is_none()
        && std::env::var_os(WORLD_SIZE_VAR).is_none()
        && (args.multi_gpu || args.num_processes.is_some_and(|n| n > 1) || args.num_machines > 1)
}

/// This machine's processes: how many, their global ranks, their GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    /// Processes over all machines.
    pub world_size: usize,
    /// The global rank of this machine's first process.
    pub first_rank: usize,
    /// Processes on this machine.
    pub local_processes: usize,
    /// The GPU of each local process (`--multi_gpu`), by local rank.
    pub gpus: Option<Vec<usize>>,
    /// Rank 0's address.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
}

/// The GPU ordinals `--gpu_ids` names (`all`, or `0,1,3`), each checked against the `count`
/// this machine has.
fn parse_gpu_ids(text: Option<&str>, count: usize) -> Result<Vec<usize>> {
    let all: Vec<usize> = (0..count).collect();
    let Some(text) = text.map(str::trim).filter(|t| !t.is_empty() && *t != "all") else {
        return Ok(all);
    };
    let mut ids = Vec::new();
    for part in text.split(',') {
        let Ok(id) = part.trim().parse::<usize>() else {
            bail!("--gpu_ids {text}: {part:?} is not a GPU number (give e.g. 0,1 or all)");
        };
        if id >= count {
            bail!(
                "--gpu_ids {text}: there is no GPU {id}; this machine has {count} ({})",
                if count == 0 {
                    "none".to_string()
                } else {
                    format!("0 to {}", count - 1)
                }
            );
        }
        if ids.contains(&id) {
            bail!("--gpu_ids {text}: GPU {id} is named twice");
        }
        ids.push(id);
    }
    Ok(ids)
}

impl LaunchPlan {
    /// Checks the flags against each other and against the `gpu_count` GPUs of this machine.
    pub fn new(args: &TrainArgs, gpu_count: usize) -> Result<Self> {
        let machines = args.num_machines;
        if machines == 0 {
            bail!("--num_machines 0: must be at least 1");
        }
        if args.machine_rank >= machines {
            bail!(
                "--machine_rank {}: must be below --num_machines {machines} (0 to {})",
                args.machine_rank,
                machines - 1
            );
        }
        let gpus = if args.multi_gpu {
            if !cfg!(feature = "cuda") {
                bail!(
                    "--multi_gpu: this build has no CUDA support (rebuild with --features cuda); for several CPU processes use --num_processes N --device cpu"
                );
            }
            let ids = parse_gpu_ids(args.gpu_ids.as_deref(), gpu_count)?;
            if ids.is_empty() {
                bail!("--multi_gpu: no GPU found on this machine");
            }
            Some(ids)
        } else {
            if args.gpu_ids.is_some() {
                bail!("--gpu_ids needs --multi_gpu");
            }
            None
        };
        let world_size = match (args.num_processes, &gpus) {
            (Some(n), _) => n,
            (None, Some(ids)) => ids.len() * machines,
            (None, None) => bail!(
                "--num_machines {machines}: give --num_processes N, the number of processes over all machines"
            ),
        };
        if world_size == 0 || !world_size.is_multiple_of(machines) {
            bail!(
                "--num_processes {world_size} cannot be shared evenly by --num_machines {machines}"
            );
        }
        let local_processes = world_size / machines;
        if let Some(ids) = &gpus
            && local_processes > ids.len()
        {
            bail!(
                "--num_processes {world_size} on {machines} machine{} is {local_processes} per machine, but only {} GPU{} {} here ({})",
                if machines == 1 { "" } else { "s" },
                ids.len(),
                if ids.len() == 1 { "" } else { "s" },
                if ids.len() == 1 { "is" } else { "are" },
                ids.iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(Self {
            world_size,
            first_rank: args.machine_rank * local_processes,
            local_processes,
            gpus: gpus.map(|ids| ids[..local_processes].to_vec()),
            master_addr: args
                .main_process_ip
                .clone()
                .unwrap_or_else(|| "127.0.0.1".to_string()),
            master_port: args.main_process_port.unwrap_or(DEFAULT_MASTER_PORT),
        })
    }
}

/// The GPUs this machine has (0 in a build without CUDA).
fn gpu_count() -> usize {
    crate::model::device::cuda_device_count()
}

/// Starts this machine's processes and waits for them (see the module doc).
pub fn launch(args: &TrainArgs) -> Result<()> {
    let plan = LaunchPlan::new(args, if args.multi_gpu { gpu_count() } else { 0 })?;
    let exe = std::env::current_exe()?;
    let mut extra = Vec::new();
    if args.seed.is_none() && args.resume_from_checkpoint.is_none() {
        // One seed for every process (each would draw its own).
        let seed = u64::from(rand::random::<u32>());
        eprintln!("note: seed {seed} (pass --seed {seed} to repeat this run)");
        extra = vec!["--seed".to_string(), seed.to_string()];
    }
    let last_rank = plan.first_rank + plan.local_processes - 1;
    eprintln!(
        "launching {} process{} (rank{} {}) of {} on this machine; rendezvous at {}:{}",
        plan.local_processes,
        if plan.local_processes == 1 { "" } else { "es" },
        if plan.local_processes == 1 { "" } else { "s" },
        if plan.local_processes == 1 {
            plan.first_rank.to_string()
        } else {
            format!("{}–{last_rank}", plan.first_rank)
        },
        plan.world_size,
        plan.master_addr,
        plan.master_port
    );
    // Ctrl+C reaches every process of the terminal's group: the training processes agree to
    // stop together, and the launcher keeps waiting for them (a second Ctrl+C ends it).
    sigint::install();
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(plan.local_processes);
    for local_rank in 0..plan.local_processes {
        let rank = plan.first_rank + local_rank;
        let mut command = Command::new(&exe);
        command
            .args(std::env::args_os().skip(1))
            .args(&extra)
            .env(LAUNCHED_VAR, "1")
            .env(RANK_VAR, rank.to_string())
            .env(WORLD_SIZE_VAR, plan.world_size.to_string())
            .env(LOCAL_RANK_VAR, local_rank.to_string())
            .env(MASTER_ADDR_VAR, &plan.master_addr)
            .env(MASTER_PORT_VAR, plan.master_port.to_string());
        if let Some(gpus) = &plan.gpus {
            command.env(CUDA_DEVICE_VAR, gpus[local_rank].to_string());
        }
        match command.spawn() {
            Ok(child) => children.push((rank, child)),
            Err(e) => {
                stop_all(&mut children);
                bail!("could not start rank {rank} ({}): {e}", exe.display());
            }
        }
    }
    supervise(children)
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "ended".to_string(),
    }
}

/// Ends the processes still running.
fn stop_all(children: &mut [(usize, Child)]) {
    for (_, child) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
    }
    for (_, child) in children.iter_mut() {
        let _ = child.wait();
    }
}

/// Waits for every process; after the first failure, gives the others [`GRACE`] to stop.
fn supervise(mut children: Vec<(usize, Child)>) -> Result<()> {
    let mut first_failure: Option<(usize, String, Instant)> = None;
    let mut running = children.len();
    let mut done = vec![false; children.len()];
    while running > 0 {
        for (i, (rank, child)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[i] = true;
                running -= 1;
                if !status.success() && first_failure.is_none() {
                    let what = describe(status);
                    if running > 0 {
                        eprintln!("rank {rank} {what}; stopping the other processes");
                    }
                    first_failure = Some((*rank, what, Instant::now()));
                }
            }
        }
        if let Some((_, _, since)) = &first_failure
            && running > 0
            && since.elapsed() > GRACE
        {
            stop_all(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        Some((rank, what, _)) => bail!("the run failed: rank {rank} {what}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn plan(flags: &[&str], gpus: usize) -> Result<LaunchPlan> {
        let mut argv = vec![
            "instruct-pix2pix",
            "train",
            "--pretrained_model_name_or_path",
            "m",
            "--train_data_dir",
            "d",
        ];
        argv.extend_from_slice(flags);
        let cli = super::super::Cli::try_parse_from(argv).expect("flags parse");
        let Some(super::super::Command::Train(args)) = cli.command else {
            panic!("not train");
        };
        LaunchPlan::new(&args, gpus)
    }

    #[test]
    fn processes_are_shared_out_by_machine() {
        let p = plan(&["--num_processes", "4"], 0).unwrap();
        assert_eq!((p.world_size, p.first_rank, p.local_processes), (4, 0, 4));
        assert_eq!(p.gpus, None);
        let p = plan(
            &[
                "--num_processes",
                "4",
                "--num_machines",
                "2",
                "--machine_rank",
                "1",
                "--main_process_ip",
                "10.1.2.3",
                "--main_process_port",
                "4000",
            ],
            0,
        )
        .unwrap();
        assert_eq!((p.world_size, p.first_rank, p.local_processes), (4, 2, 2));
        assert_eq!((p.master_addr.as_str(), p.master_port), ("10.1.2.3", 4000));
    }

    #[test]
    fn inconsistent_launch_flags_get_one_clear_line() {
        for (flags, needle) in [
            (
                &["--num_processes", "3", "--num_machines", "2"][..],
                "shared evenly",
            ),
            (&["--num_machines", "2"][..], "give --num_processes"),
            (
                &[
                    "--num_processes",
                    "2",
                    "--num_machines",
                    "2",
                    "--machine_rank",
                    "2",
                ][..],
                "--machine_rank 2",
            ),
            (
                &["--num_processes", "2", "--gpu_ids", "0"][..],
                "needs --multi_gpu",
            ),
        ] {
            let error = plan(flags, 0).unwrap_err().to_string();
            assert!(error.contains(needle), "{flags:?}: {error}");
        }
        if !cfg!(feature = "cuda") {
            let error = plan(&["--multi_gpu"], 0).unwrap_err().to_string();
            assert!(error.contains("no CUDA support"), "{error}");
        }
    }

    #[test]
    fn gpu_ids_are_checked_against_the_machine() {
        assert_eq!(parse_gpu_ids(None, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_gpu_ids(Some("all"), 2).unwrap(), vec![0, 1]);
        assert_eq!(parse_gpu_ids(Some("2, 0"), 3).unwrap(), vec![2, 0]);
        let error = parse_gpu_ids(Some("0,3"), 2).unwrap_err().to_string();
        assert!(
            error.contains("there is no GPU 3; this machine has 2 (0 to 1)"),
            "{error}"
        );
        let error = parse_gpu_ids(Some("1,1"), 2).unwrap_err().to_string();
        assert!(error.contains("named twice"), "{error}");
        let error = parse_gpu_ids(Some("x"), 2).unwrap_err().to_string();
        assert!(error.contains("not a GPU number"), "{error}");
    }
}
