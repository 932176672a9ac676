//! The rendezvous: rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects
//! (retrying until the timeout), says which rank it is, the world size it was started with and
//! the port of its own ring listener; when all have come, rank 0 answers each with the table of
//! ring addresses (and NCCL's unique id on CUDA). One line of text each way:
//!
//! - join: `IP2P-RDV 1 RANK WORLD RING_PORT`
//! - answer: `OK WORLD NCCL_ID_HEX|- ADDR_0 ADDR_1 ...`, or `ERR message` when the join is refused
//!   (a world size that differs, a rank taken twice).
//!
//! Waiting ends early when the run is asked to stop (Ctrl+C, the window's Stop, or a rank of the
//! same program that failed before it joined): `cancel` is polled while rank 0 waits for joins
//! and while the others try to reach it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{DistributedError, WorldConfig};

/// The protocol's first words (and version).
const HELLO: &str = "IP2P-RDV 1";
/// A rendezvous line longer than this is not ours.
const MAX_LINE: u64 = 1 << 16;
/// Pause between tries to reach rank 0, and between polls for joins.
const POLL: Duration = Duration::from_millis(50);

/// What the rendezvous gave a rank.
#[derive(Debug)]
pub struct Met {
    /// Where each rank's ring listener is, by rank.
    pub ring_addrs: Vec<SocketAddr>,
    /// This rank's ring listener (its predecessor connects to it).
    pub ring_listener: TcpListener,
    /// NCCL's unique id from rank 0 (empty on the CPU).
    pub nccl_id: Vec<u8>,
}

/// Meets the other ranks (see the module doc). `nccl_id` is rank 0's NCCL id to hand out;
/// setting `cancel` ends the wait with [`DistributedError::Cancelled`].
pub fn meet(
    world: &WorldConfig,
    nccl_id: Option<&[u8]>,
    cancel: &AtomicBool,
) -> Result<Met, DistributedError> {
    let master = world.master_socket_addr()?;
    let listen_ip = if world.rank == 0 {
        master.ip()
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let ring_listener =
        TcpListener::bind((listen_ip, 0)).map_err(|source| DistributedError::Listen {
            addr: format!("{listen_ip}:0"),
            source,
        })?;
    let ring_port = ring_listener
        .local_addr()
        .map_err(|source| DistributedError::Listen {
            addr: format!("{listen_ip}:0"),
            source,
        })?
        .port();
    let (ring_addrs, nccl_id) = if world.rank == 0 {
        host(
            world,
            master,
            ring_port,
            nccl_id.unwrap_or_default(),
            cancel,
        )?
    } else {
        join(world, master, ring_port, cancel)?
    };
    Ok(Met {
        ring_addrs,
        ring_listener,
        nccl_id,
    })
}

fn io_timeout(world: &WorldConfig, what: &str, error: &std::io::Error) -> DistributedError {
    DistributedError::MasterUnreachable {
        addr: world.master(),
        seconds: world.timeout.as_secs(),
        reason: format!("{what}: {error}"),
    }
}

/// Rank 0: waits for every other rank, then answers each with the table.
fn host(
    world: &WorldConfig,
    master: SocketAddr,
    ring_port: u16,
    nccl_id: &[u8],
    cancel: &AtomicBool,
) -> Result<(Vec<SocketAddr>, Vec<u8>), DistributedError> {
    let listener = TcpListener::bind(master).map_err(|source| DistributedError::Listen {
        addr: world.master(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| DistributedError::Listen {
            addr: world.master(),
            source,
        })?;
    let deadline = Instant::now() + world.timeout;
    let mut joined: Vec<Option<(TcpStream, SocketAddr)>> =
        (0..world.world_size).map(|_| None).collect();
    let mut waiting = world.world_size - 1;
    while waiting > 0 {
        match listener.accept() {
            Ok((stream, peer)) => {
                // A stray connection (a port scanner, a client of another program) is dropped,
                // not fatal.
                let (rank, ring_port) = match read_join(world, &stream) {
                    Ok(joined) => joined,
                    Err(Some(message)) => return Err(DistributedError::Mismatch(message)),
                    Err(None) => continue,
                };
                if joined[rank].is_some() {
                    let message = format!("two processes say they are rank {rank}");
                    refuse(stream, &message);
                    return Err(DistributedError::Mismatch(message));
                }
                joined[rank] = Some((stream, SocketAddr::new(peer.ip(), ring_port)));
                waiting -= 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if cancel.load(Ordering::SeqCst) {
                    return Err(DistributedError::Cancelled {
                        addr: world.master(),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(DistributedError::MissingRanks {
                        missing: (1..world.world_size)
                            .filter(|&r| joined[r].is_none())
                            .collect(),
                        addr: world.master(),
                        seconds: world.timeout.as_secs(),
                    });
                }
                std::thread::sleep(POLL);
            }
            Err(e) => {
                return Err(DistributedError::Listen {
                    addr: world.master(),
                    source: e,
                });
            }
        }
    }
    let mut addrs = vec![SocketAddr::new(master.ip(), ring_port)];
    addrs.extend(joined.iter().skip(1).flatten().map(|(_, addr)| *addr));
    let id_hex = if nccl_id.is_empty() {
        "-".to_string()
    } else {
        nccl_id.iter().map(|b| format!("{b:02x}")).collect()
    };
    let table = addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    let answer = format!("OK {} {id_hex} {table}\n", world.world_size);
    for (rank, entry) in joined.iter_mut().enumerate().skip(1) {
        if let Some((stream, _)) = entry {
            stream
                .write_all(answer.as_bytes())
                .map_err(|e| DistributedError::PeerClosed {
                    rank,
                    what: format!("at the rendezvous: {e}"),
                })?;
        }
    }
    Ok((addrs, nccl_id.to_vec()))
}

/// Reads and checks one rank's join line: `Err(None)` for a connection that is not a rank of
/// ours (dropped), `Err(Some(message))` for a rank of another shape of run (answered with `ERR`).
fn read_join(world: &WorldConfig, stream: &TcpStream) -> Result<(usize, u16), Option<String>> {
    stream.set_nonblocking(false).map_err(|_| None)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|_| None)?;
    let line = read_line(stream).map_err(|_| None)?;
    let rest = line.strip_prefix(HELLO).ok_or(None)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let [rank, size, port] = fields[..] else {
        return Err(None);
    };
    let (Ok(rank), Ok(size), Ok(port)) = (
        rank.parse::<usize>(),
        size.parse::<usize>(),
        port.parse::<u16>(),
    ) else {
        return Err(None);
    };
    if size != world.world_size || rank == 0 || rank >= world.world_size {
        let message = format!(
            "rank {rank} was started for {size} processes, rank 0 for {} (give every machine the same --num_processes and --num_machines)",
            world.world_size
        );
        if let Ok(stream) = stream.try_clone() {
            refuse(stream, &message);
        }
        return Err(Some(message));
    }
    Ok((rank, port))
}

fn refuse(mut stream: TcpStream, message: &str) {
    let _ = stream.write_all(format!("ERR {message}\n").as_bytes());
}

fn read_line(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// Ranks 1..: reaches rank 0 (retrying), joins and reads the table.
fn join(
    world: &WorldConfig,
    master: SocketAddr,
    ring_port: u16,
    cancel: &AtomicBool,
) -> Result<(Vec<SocketAddr>, Vec<u8>), DistributedError> {
    let deadline = Instant::now() + world.timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&master, Duration::from_secs(5)) {
            Ok(stream) => break stream,
            Err(_) if cancel.load(Ordering::SeqCst) => {
                return Err(DistributedError::Cancelled {
                    addr: world.master(),
                });
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(io_timeout(world, "connecting", &e));
            }
            Err(_) => std::thread::sleep(POLL),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    // Rank 0 answers once all have joined: wait as long as the rendezvous may take.
    stream
        .set_read_timeout(Some(left))
        .and_then(|_| {
            stream.write_all(
                format!("{HELLO} {} {} {ring_port}\n", world.rank, world.world_size).as_bytes(),
            )
        })
        .map_err(|e| io_timeout(world, "joining", &e))?;
    let line = read_line(&stream).map_err(|e| io_timeout(world, "waiting for the others", &e))?;
    if let Some(message) = line.strip_prefix("ERR ") {
        return Err(DistributedError::Mismatch(message.to_string()));
    }
    let bad = || DistributedError::Mismatch(format!("rank 0 answered {line:?}"));
    let mut fields = line.strip_prefix("OK ").ok_or_else(bad)?.split_whitespace();
    let size: usize = fields.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    if size != world.world_size {
        return Err(bad());
    }
    let id_hex = fields.next().ok_or_else(bad)?;
    let nccl_id = if id_hex == "-" {
        Vec::new()
    } else {
        (0..id_hex.len() / 2)
            .map(|i| u8::from_str_radix(id_hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?
    };
    let addrs = fields
        .map(|a| a.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad())?;
    if addrs.len() != size {
        return Err(bad());
    }
    Ok((addrs, nccl_id))
}
