//! The CPU's backend: a ring all-reduce over TCP. Each rank sends to the next (`rank + 1`) and
//! receives from the previous; a sum of `n` values per rank moves `2·(n−1)/n` of them through
//! each link (a reduce-scatter, then an all-gather), so the volume per rank does not grow with
//! the number of ranks. Each chunk's sum is computed by one rank and passed on, so every rank
//! ends with the same bits.
//!
//! Every message carries a sequence number and its length: two ranks at different points of a
//! run (started with other settings) are told apart from a slow one. A closed connection names
//! the peer that went away; silence longer than the timeout names the peer that hung.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::rendezvous::Met;
use super::{DistributedError, WorldConfig};

/// A rank's two ring connections.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    world_size: usize,
    /// To rank + 1.
    next: TcpStream,
    /// From rank − 1.
    prev: TcpStream,
    timeout: Duration,
    /// Messages sent so far (each side counts; a mismatch is a desynchronised run).
    sequence: u64,
}

const HEADER: usize = 16;

impl TcpRing {
    /// Connects to the next rank's ring listener and accepts the previous rank's connection.
    pub fn connect(world: &WorldConfig, met: &Met) -> Result<Self, DistributedError> {
        let n = world.world_size;
        let next_rank = (world.rank + 1) % n;
        let prev_rank = (world.rank + n - 1) % n;
        let deadline = Instant::now() + world.timeout;
        let next_addr = met.ring_addrs[next_rank];
        let mut next = loop {
            match TcpStream::connect_timeout(&next_addr, Duration::from_secs(5)) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => {
                    return Err(DistributedError::PeerClosed {
                        rank: next_rank,
                        what: format!("connecting to its ring port {next_addr}: {e}"),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        next.write_all(&(world.rank as u64).to_le_bytes())
            .map_err(|e| DistributedError::PeerClosed {
                rank: next_rank,
                what: format!("greeting: {e}"),
            })?;
        let mut prev = accept_rank(&met.ring_listener, prev_rank, deadline, world.timeout)?;
        for stream in [&mut next, &mut prev] {
            stream
                .set_nodelay(true)
                .and_then(|_| stream.set_read_timeout(Some(world.timeout)))
                .and_then(|_| stream.set_write_timeout(Some(world.timeout)))
                .map_err(|e| DistributedError::PeerClosed {
                    rank: prev_rank,
                    what: format!("setting up the ring: {e}"),
                })?;
        }
        Ok(Self {
            rank: world.rank,
            world_size: n,
            next,
            prev,
            timeout: world.timeout,
            sequence: 0,
        })
    }

    /// Sums `values` across the ranks in place (see the module doc).
    pub fn all_reduce(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
        let n = self.world_size;
        if n < 2 {
            return Ok(());
        }
        let bounds: Vec<usize> = (0..=n).map(|i| values.len() * i / n).collect();
        let range = |chunk: usize| bounds[chunk]..bounds[chunk + 1];
        let r = self.rank;
        // Reduce-scatter: after n − 1 steps rank r holds the whole sum of chunk r + 1.
        for step in 0..n - 1 {
            let send = (r + n - step) % n;
            let recv = (r + 2 * n - step - 1) % n;
            let received = self.exchange(&values[range(send)], range(recv).len())?;
            for (v, x) in values[range(recv)].iter_mut().zip(received) {
                *v += x;
            }
        }
        // All-gather: the finished chunks go round once.
        for step in 0..n - 1 {
            let send = (r + 1 + n - step) % n;
            let recv = (r + n - step) % n;
            let received = self.exchange(&values[range(send)], range(recv).len())?;
            values[range(recv)].copy_from_slice(&received);
        }
        Ok(())
    }

    /// Sends `out` to the next rank while receiving `expect` values from the previous one.
    fn exchange(&mut self, out: &[f32], expect: usize) -> Result<Vec<f32>, DistributedError> {
        let sequence = self.sequence;
        self.sequence += 1;
        let n = self.world_size;
        let next_rank = (self.rank + 1) % n;
        let prev_rank = (self.rank + n - 1) % n;
        let seconds = self.timeout.as_secs();
        let mut message = Vec::with_capacity(HEADER + out.len() * 4);
        message.extend_from_slice(&sequence.to_le_bytes());
        message.extend_from_slice(&(out.len() as u64).to_le_bytes());
        for v in out {
            message.extend_from_slice(&v.to_le_bytes());
        }
        let (next, prev) = (&mut self.next, &mut self.prev);
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || next.write_all(&message));
            let received = receive(prev, sequence, expect).map_err(|e| match e {
                Received::Io(e) => peer_error(prev_rank, "receiving", &e, seconds),
                Received::Mismatch(m) => DistributedError::Mismatch(format!(
                    "rank {prev_rank} {m} (were the ranks started with the same settings?)"
                )),
            });
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the sending thread failed")));
            let values = received?;
            sent.map_err(|e| peer_error(next_rank, "sending", &e, seconds))?;
            Ok(values)
        })
    }
}

enum Received {
    Io(std::io::Error),
    Mismatch(String),
}

fn receive(stream: &mut TcpStream, sequence: u64, expect: usize) -> Result<Vec<f32>, Received> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).map_err(Received::Io)?;
    let their_sequence = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
    if their_sequence != sequence || len != expect as u64 {
        return Err(Received::Mismatch(format!(
            "sent message {their_sequence} of {len} values where this rank expected message {sequence} of {expect}"
        )));
    }
    let mut bytes = vec![0u8; expect * 4];
    stream.read_exact(&mut bytes).map_err(Received::Io)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn peer_error(rank: usize, what: &str, error: &std::io::Error, seconds: u64) -> DistributedError {
    match error.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            DistributedError::PeerTimeout { rank, seconds }
        }
        _ => DistributedError::PeerClosed {
            rank,
            what: format!("{what}: {error}"),
        },
    }
}

/// Accepts the previous rank's ring connection (it says its rank first).
fn accept_rank(
    listener: &TcpListener,
    prev_rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, DistributedError> {
    let fail = |what: String| DistributedError::PeerClosed {
        rank: prev_rank,
        what,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|_| stream.set_read_timeout(Some(Duration::from_secs(10))))
                    .map_err(|e| fail(e.to_string()))?;
                let mut rank = [0u8; 8];
                match stream.read_exact(&mut rank) {
                    Ok(()) if u64::from_le_bytes(rank) == prev_rank as u64 => return Ok(stream),
                    // Not our predecessor: a stray connection, dropped.
                    _ => continue,
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(DistributedError::PeerTimeout {
                        rank: prev_rank,
                        seconds: timeout.as_secs(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(format!("accepting its ring connection: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ProcessGroup, WorldConfig};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// `world` ranks as threads of this test, each running `work` on its connected group.
    fn run_world<T: Send>(
        world: usize,
        timeout: Duration,
        work: impl Fn(&mut ProcessGroup) -> T + Sync,
    ) -> Vec<T> {
        let port = free_port();
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let work = &work;
                    scope.spawn(move || {
                        let config = WorldConfig {
                            rank,
                            world_size: world,
                            local_rank: rank,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            timeout,
                        };
                        let mut group = ProcessGroup::connect(
                            &config,
                            &candle_core::Device::Cpu,
                            &AtomicBool::new(false),
                        )
                        .unwrap();
                        work(&mut group)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn ring_sums_agree_bit_for_bit_on_every_rank() {
        for world in [2usize, 3, 5] {
            // Lengths below, at and above the world size, and one that splits unevenly.
            for len in [0usize, 1, world, 1001] {
                let results = run_world(world, Duration::from_secs(20), |group| {
                    let rank = group.rank();
                    let mut values: Vec<f32> = (0..len)
                        .map(|i| (i as f32 * 0.37 + rank as f32 * 1.3).sin())
                        .collect();
                    group.all_reduce_host(&mut values).unwrap();
                    values
                });
                for (i, &summed) in results[0].iter().enumerate() {
                    let expected: f64 = (0..world)
                        .map(|rank| f64::from((i as f32 * 0.37 + rank as f32 * 1.3).sin()))
                        .sum();
                    assert!(
                        (f64::from(summed) - expected).abs() < 1e-5,
                        "world {world}, len {len}, value {i}"
                    );
                }
                assert_eq!(results[0].len(), len);
                for other in &results[1..] {
                    let same = other
                        .iter()
                        .zip(&results[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "world {world}, len {len}: ranks differ");
                }
            }
        }
    }

    #[test]
    fn gathers_tensors_and_barriers_work() {
        let results = run_world(3, Duration::from_secs(20), |group| {
            let rank = group.rank() as u64;
            let gathered = group.all_gather_u64(u64::MAX - rank).unwrap();
            group.barrier().unwrap();
            let t = candle_core::Tensor::new(&[rank as f32, 1.0, 2.0], &candle_core::Device::Cpu)
                .unwrap();
            let summed = group.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
            (gathered, summed)
        });
        for (gathered, summed) in results {
            assert_eq!(gathered, vec![u64::MAX, u64::MAX - 1, u64::MAX - 2]);
            assert_eq!(summed, vec![3.0, 3.0, 6.0]);
        }
    }

    #[test]
    fn a_rank_that_goes_away_is_named() {
        let results = run_world(2, Duration::from_secs(20), |group| {
            if group.rank() == 1 {
                return None;
            }
            // Rank 1's group was dropped: its sockets are closed.
            std::thread::sleep(Duration::from_millis(200));
            let mut values = vec![1.0f32; 8];
            Some(group.all_reduce_host(&mut values).unwrap_err().to_string())
        });
        let message = results[0].as_ref().unwrap();
        assert!(message.contains("rank 1 stopped or crashed"), "{message}");
    }

    #[test]
    fn a_rank_that_hangs_is_named_after_the_timeout() {
        let results = run_world(2, Duration::from_secs(1), |group| {
            if group.rank() == 1 {
                // Alive (connections open) but never joins the sum.
                std::thread::sleep(Duration::from_secs(3));
                return None;
            }
            let mut values = vec![1.0f32; 8];
            Some(group.all_reduce_host(&mut values).unwrap_err().to_string())
        });
        let message = results[0].as_ref().unwrap();
        assert!(message.contains("rank 1 sent nothing for 1 s"), "{message}");
    }

    #[test]
    fn ranks_started_for_different_worlds_are_refused() {
        let port = free_port();
        let config = |rank, world_size| WorldConfig {
            rank,
            world_size,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(10),
        };
        let never = AtomicBool::new(false);
        let (zero, one) = std::thread::scope(|scope| {
            let zero = scope.spawn(|| {
                ProcessGroup::connect(&config(0, 2), &candle_core::Device::Cpu, &never).map(|_| ())
            });
            let one = scope.spawn(|| {
                ProcessGroup::connect(&config(1, 3), &candle_core::Device::Cpu, &never).map(|_| ())
            });
            (zero.join().unwrap(), one.join().unwrap())
        });
        for result in [zero, one] {
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("rank 1 was started for 3 processes, rank 0 for 2"),
                "{message}"
            );
        }
    }

    /// A stop request ends the wait at the rendezvous at once, on rank 0 (waiting for joins)
    /// and on the others (trying to reach rank 0), instead of after the hour-long timeout.
    #[test]
    fn a_stop_request_ends_the_wait_at_the_rendezvous() {
        for rank in [0, 1] {
            let config = WorldConfig {
                rank,
                world_size: 2,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: free_port(),
                timeout: Duration::from_secs(3600),
            };
            let cancel = AtomicBool::new(false);
            let started = Instant::now();
            let result = std::thread::scope(|scope| {
                let waiting = scope
                    .spawn(|| ProcessGroup::connect(&config, &candle_core::Device::Cpu, &cancel));
                std::thread::sleep(Duration::from_millis(300));
                cancel.store(true, Ordering::SeqCst);
                waiting.join().unwrap()
            });
            let message = result.unwrap_err().to_string();
            assert!(
                message.contains("stopped while waiting for the other processes at 127.0.0.1:"),
                "rank {rank}: {message}"
            );
            assert!(started.elapsed() < Duration::from_secs(10), "rank {rank}");
        }
    }
}
