//! The processes `strait bench services` starts inside its lab: a 1-byte server for the
//! backends, a new-connection client, and a probe that waits for a service change to show.
//! They are plain blocking code on one thread each, pinned to a CPU, so that what is measured
//! is the kernel path and not a runtime.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Pins the calling process to `cpu` (modulo the CPUs it may use).
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    set.set(cpu % available).context("building the CPU set")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// Closes with a reset: no TIME_WAIT is left behind, so the client's ports never run out and
/// the rate is the path's, not the port range's. Every mode is measured the same way.
fn reset_on_close(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the descriptor is open for the lifetime of `stream`; the option value is a local
    // of the size passed.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves forever: accept, read one byte, write it back, close.
pub fn serve(port: u16, cpu: usize) -> anyhow::Result<()> {
    pin_to_cpu(cpu)?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding port {port}"))?;
    loop {
        let Ok((mut stream, _)) = listener.accept() else { continue };
        let mut byte = [0u8; 1];
        // A client that resets early is part of the game, not an error of the server.
        if stream.read_exact(&mut byte).is_ok() {
            let _ = stream.write_all(&byte);
        }
    }
}

/// One run of [`conn_rate`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnRateReport {
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU time of the client (user + system) while measuring.
    pub client_cpu_seconds: f64,
    pub first_error: Option<String>,
}

fn one_connection(target: SocketAddrV4, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout)?;
    reset_on_close(&stream)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&[1])?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(())
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[index]) / 1000.0
}

/// New connections one after another (connect, 1-byte request, 1-byte answer, close) for
/// `warmup` unmeasured, then for `duration`, each timed from connect to close.
pub fn conn_rate(
    target: SocketAddrV4,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<ConnRateReport> {
    pin_to_cpu(cpu)?;
    let timeout = Duration::from_secs(1);
    let mut report = ConnRateReport::default();
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        if let Err(error) = one_connection(target, timeout) {
            report.errors += 1;
            report.first_error.get_or_insert_with(|| format!("warm-up: {error}"));
        }
    }
    let mut latencies_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    while started.elapsed() < duration {
        let begun = Instant::now();
        match one_connection(target, timeout) {
            Ok(()) => {
                latencies_ns.push(u32::try_from(begun.elapsed().as_nanos()).unwrap_or(u32::MAX))
            }
            Err(error) => {
                report.errors += 1;
                report.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.client_cpu_seconds = cpu_seconds() - cpu_before;
    latencies_ns.sort_unstable();
    report.connections = latencies_ns.len() as u64;
    report.per_second = report.connections as f64 / report.seconds;
    report.p50_us = percentile(&latencies_ns, 0.50);
    report.p90_us = percentile(&latencies_ns, 0.90);
    report.p99_us = percentile(&latencies_ns, 0.99);
    report.p999_us = percentile(&latencies_ns, 0.999);
    Ok(report)
}

/// Reads `open ADDR` or `closed ADDR` lines on stdin; for each, connects to ADDR again and
/// again until a connection is answered (`open`) or refused or unreachable (`closed`), then
/// prints `ok <attempts>`, or `timeout` after 10 s. The bench writes the line, makes its
/// change, and times until the answer.
pub fn probe() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.context("reading a probe request")?;
        let Some((want, address)) = line.split_once(' ') else { continue };
        let target: SocketAddrV4 =
            address.trim().parse().with_context(|| format!("probe address {address:?}"))?;
        let want_open = want == "open";
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut attempts = 0u64;
        let answer = loop {
            attempts += 1;
            // A refused or unreachable connect fails at once, but the node's ICMP errors for
            // the unreachable route are rate-limited by a global (root namespace) setting, so
            // most failures are timeouts: short while waiting for `open` (a false miss costs
            // 5 ms), longer while waiting for `closed` (a connection here takes ~0.1 ms).
            let timeout = Duration::from_millis(if want_open { 5 } else { 50 });
            let open = one_connection(target, timeout).is_ok();
            if open == want_open {
                break format!("ok {attempts}");
            }
            if Instant::now() > deadline {
                break "timeout".to_owned();
            }
        };
        writeln!(stdout, "{answer}")?;
        stdout.flush()?;
    }
    Ok(())
}
