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

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};
use strait_controlplane::nodesync_proto::{Endpoint, EndpointPort, ServicePort, ServiceState};

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

/// What a client asks of the server with its first byte.
pub mod request {
    /// One byte back, then the server closes: a whole new connection (`conn-rate`, `probe`).
    pub const ONCE: u8 = b'c';
    /// Every byte after this one is answered with one byte until the client closes
    /// (`request-response`).
    pub const ECHO_EACH: u8 = b'r';
    /// Everything after this one is read and counted; when the client shuts its side down the
    /// server answers with the count (8 bytes, big-endian) (`stream`).
    pub const SINK: u8 = b's';
}

/// Longest a server waits on a silent client before giving up on its connection, so a client
/// that vanished without a FIN or reset never blocks the next one.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves forever, one connection at a time (the bench runs one client at a time): the first
/// byte of a connection says what the client wants (see [`request`]).
pub fn serve(port: u16, cpu: usize) -> anyhow::Result<()> {
    pin_to_cpu(cpu)?;
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding port {port}"))?;
    loop {
        let Ok((stream, _)) = listener.accept() else { continue };
        // A client that resets early is part of the game, not an error of the server.
        let _ = serve_connection(stream);
    }
}

fn serve_connection(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    match first[0] {
        request::ECHO_EACH => {
            stream.set_nodelay(true)?;
            let mut byte = [0u8; 1];
            loop {
                if stream.read(&mut byte)? == 0 {
                    return Ok(());
                }
                stream.write_all(&byte)?;
            }
        }
        request::SINK => {
            let mut buffer = vec![0u8; STREAM_CHUNK];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buffer)? {
                    0 => break,
                    read => total += read as u64,
                }
            }
            stream.write_all(&total.to_be_bytes())
        }
        // ONCE, and anything else: one byte back, then close.
        byte => stream.write_all(&[byte]),
    }
}

/// One run of [`conn_rate`] or [`request_response`]: operations one after another, each timed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RateRun {
    /// Operations completed in the measured part (connections, or request/response pairs).
    pub count: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// CPU time (user + system) while measuring: the client's, to which the bench adds the
    /// server's.
    pub cpu_seconds: f64,
    pub first_error: Option<String>,
}

/// One run of [`stream`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamRun {
    /// Bytes the server counted after the warm-up.
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_per_second: f64,
    pub cpu_seconds: f64,
}

/// Bytes per write of [`stream`] and per read of its server.
const STREAM_CHUNK: usize = 128 * 1024;

fn one_connection(target: SocketAddrV4, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout)?;
    reset_on_close(&stream)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&[request::ONCE])?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(())
}

/// CPU time of the calling thread alone.
pub(crate) fn thread_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
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

/// Runs `operation` for `warmup` unmeasured, then for `duration`, timing each one.
fn timed_operations(
    warmup: Duration,
    duration: Duration,
    mut operation: impl FnMut() -> std::io::Result<()>,
) -> RateRun {
    let mut run = RateRun::default();
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        if let Err(error) = operation() {
            run.errors += 1;
            run.first_error.get_or_insert_with(|| format!("warm-up: {error}"));
        }
    }
    let mut latencies_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    while started.elapsed() < duration {
        let begun = Instant::now();
        match operation() {
            Ok(()) => {
                latencies_ns.push(u32::try_from(begun.elapsed().as_nanos()).unwrap_or(u32::MAX))
            }
            Err(error) => {
                run.errors += 1;
                run.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.cpu_seconds = cpu_seconds() - cpu_before;
    latencies_ns.sort_unstable();
    run.count = latencies_ns.len() as u64;
    run.per_second = run.count as f64 / run.seconds;
    run.p50_us = percentile(&latencies_ns, 0.50);
    run.p90_us = percentile(&latencies_ns, 0.90);
    run.p99_us = percentile(&latencies_ns, 0.99);
    run.p999_us = percentile(&latencies_ns, 0.999);
    run
}

/// New connections one after another (connect, 1-byte request, 1-byte answer, close) for
/// `warmup` unmeasured, then for `duration`, each timed from connect to close.
pub fn conn_rate(
    target: SocketAddrV4,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<RateRun> {
    pin_to_cpu(cpu)?;
    let timeout = Duration::from_secs(1);
    Ok(timed_operations(warmup, duration, || one_connection(target, timeout)))
}

/// One connection, opened before the clock starts; then 1-byte requests each waiting for its
/// 1-byte answer (Nagle off on both sides), for `warmup` unmeasured, then for `duration`: what
/// an established connection costs per round trip.
pub fn request_response(
    target: SocketAddrV4,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<RateRun> {
    pin_to_cpu(cpu)?;
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&target.into(), timeout)
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&[request::ECHO_EACH])?;
    let mut byte = [0u8; 1];
    let run = timed_operations(warmup, duration, || {
        stream.write_all(&[7])?;
        stream.read_exact(&mut byte)
    });
    ensure!(
        run.errors == 0,
        "request/response to {target}: {} errors, the first: {:?}",
        run.errors,
        run.first_error
    );
    Ok(run)
}

/// One connection writing 128 KiB chunks as fast as it can for `warmup`, then for `duration`;
/// then it shuts its side down and reads how many bytes the server received. The throughput is
/// the server's count less what had been written by the end of the warm-up, over the time
/// from then until the count arrived (it can overstate by at most the socket buffers the
/// warm-up had filled: a few MiB against gigabytes).
pub fn stream(
    target: SocketAddrV4,
    warmup: Duration,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<StreamRun> {
    pin_to_cpu(cpu)?;
    let mut stream = TcpStream::connect_timeout(&target.into(), Duration::from_secs(1))
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&[request::SINK])?;
    let chunk = vec![0x5au8; STREAM_CHUNK];
    let mut written = 0u64;
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        stream.write_all(&chunk).context("streaming (warm-up)")?;
        written += chunk.len() as u64;
    }
    let written_at_start = written;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    while started.elapsed() < duration {
        stream.write_all(&chunk).context("streaming")?;
        written += chunk.len() as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).context("reading the server's byte count")?;
    let seconds = started.elapsed().as_secs_f64();
    let received = u64::from_be_bytes(count);
    ensure!(received == written, "the server counted {received} bytes of the {written} written");
    let bytes = received - written_at_start;
    Ok(StreamRun {
        bytes,
        seconds,
        gbit_per_second: bytes as f64 * 8.0 / seconds / 1e9,
        cpu_seconds: cpu_seconds() - cpu_before,
    })
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the bench and the processes it starts, so
/// a time the probe reports can be set against one the bench took.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// One probe connection in flight.
struct ProbeAttempt {
    socket: socket2::Socket,
    started_ns: u64,
    /// The request byte is out; the answer is awaited.
    sent: bool,
    /// SO_ERROR was read once the attempt was a millisecond old.
    checked_late: bool,
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttemptEnd {
    Answered,
    /// Refused or unreachable.
    Failed,
    /// Nothing within the attempt's timeout: a packet went nowhere.
    TimedOut,
}

impl ProbeAttempt {
    /// Starts an attempt at `started_ns`; `Err` when it failed at once.
    fn launch(target: SocketAddrV4, started_ns: u64) -> Result<Self, AttemptEnd> {
        use socket2::{Domain, Socket, Type};
        let socket =
            Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|_| AttemptEnd::Failed)?;
        // Closed with a reset, never lingering; non-blocking, so many can be in flight.
        let _ = socket.set_linger(Some(Duration::ZERO));
        socket.set_nonblocking(true).map_err(|_| AttemptEnd::Failed)?;
        match socket.connect(&std::net::SocketAddr::V4(target).into()) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(_) => return Err(AttemptEnd::Failed),
        }
        let attempt = Self { socket, started_ns, sent: false, checked_late: false };
        // An ICMP error met while connect() held the socket is only a soft error: no poll
        // event, but SO_ERROR has it (net/ipv4/tcp_ipv4.c, tcp_v4_err; net/core/sock.c).
        if attempt.has_error() {
            return Err(AttemptEnd::Failed);
        }
        Ok(attempt)
    }

    fn has_error(&self) -> bool {
        !matches!(self.socket.take_error(), Ok(None))
    }

    /// Moves the attempt on after poll() reported `revents` for it; `Some` once it has ended.
    fn advance(
        &mut self,
        revents: libc::c_short,
        now_ns: u64,
        timeout: Duration,
    ) -> Option<AttemptEnd> {
        use std::io::Read as _;
        if revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Some(AttemptEnd::Failed);
        }
        if !self.sent && revents & libc::POLLOUT != 0 {
            if self.has_error() || (&self.socket).write(&[request::ONCE]).ok() != Some(1) {
                return Some(AttemptEnd::Failed);
            }
            self.sent = true;
        } else if self.sent && revents & libc::POLLIN != 0 {
            let mut byte = [0u8; 1];
            return Some(match (&self.socket).read(&mut byte) {
                Ok(1) => AttemptEnd::Answered,
                _ => AttemptEnd::Failed,
            });
        }
        let age = Duration::from_nanos(now_ns.saturating_sub(self.started_ns));
        if !self.sent && !self.checked_late && age > Duration::from_millis(1) {
            self.checked_late = true;
            if self.has_error() {
                return Some(AttemptEnd::Failed);
            }
        }
        (age > timeout).then_some(AttemptEnd::TimedOut)
    }

    fn events(&self) -> libc::c_short {
        if self.sent { libc::POLLIN } else { libc::POLLOUT }
    }
}

/// What one probe request found.
struct ProbeOutcome {
    attempts: u64,
    timeouts: u64,
    /// When the first attempt that saw the wanted state started (CLOCK_MONOTONIC, ns).
    seen_at_ns: u64,
}

/// Connection attempts to `target`, a new one every `CADENCE` whatever became of the earlier
/// ones, until one sees the wanted state (answered for `open`; refused, unreachable or
/// unanswered for `closed`) and every attempt started before it has ended too. Returns when
/// that attempt started: the datapath changed between the start of the attempt before it and
/// that moment, however long the attempts took to end. `started` is called once the first
/// attempt is out.
fn probe_until(
    target: SocketAddrV4,
    want_open: bool,
    deadline: Instant,
    started: &mut dyn FnMut() -> std::io::Result<()>,
) -> anyhow::Result<Option<ProbeOutcome>> {
    const CADENCE: Duration = Duration::from_micros(200);
    // Longer than any answer takes on a loaded machine; an attempt this old saw no backend.
    const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);
    const MAX_IN_FLIGHT: usize = 512;
    let mut in_flight: Vec<ProbeAttempt> = Vec::new();
    let mut outcome = ProbeOutcome { attempts: 0, timeouts: 0, seen_at_ns: 0 };
    // The earliest start of an ended attempt that saw the wanted state.
    let mut seen: Option<u64> = None;
    let mut next_launch = Instant::now();
    let mut announced = false;
    loop {
        let now = Instant::now();
        if now >= next_launch && in_flight.len() < MAX_IN_FLIGHT {
            outcome.attempts += 1;
            let started_ns = monotonic_ns();
            match ProbeAttempt::launch(target, started_ns) {
                Ok(attempt) => in_flight.push(attempt),
                // Refused or unreachable at once.
                Err(_) if !want_open => seen = Some(seen.map_or(started_ns, |s| s.min(started_ns))),
                Err(_) => {}
            }
            next_launch = now + CADENCE;
            if !announced {
                announced = true;
                started()?;
            }
        }
        let mut polls: Vec<libc::pollfd> = in_flight
            .iter()
            .map(|a| libc::pollfd { fd: a.socket.as_raw_fd(), events: a.events(), revents: 0 })
            .collect();
        let wait = next_launch.saturating_duration_since(Instant::now()).as_millis() as libc::c_int;
        // SAFETY: `polls` is a live array of as many pollfds as passed.
        unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, wait) };
        let now_ns = monotonic_ns();
        let mut index = 0;
        while index < in_flight.len() {
            match in_flight[index].advance(polls[index].revents, now_ns, ATTEMPT_TIMEOUT) {
                None => index += 1,
                Some(end) => {
                    let attempt = in_flight.swap_remove(index);
                    polls.swap_remove(index);
                    outcome.timeouts += u64::from(end == AttemptEnd::TimedOut);
                    if (end == AttemptEnd::Answered) == want_open {
                        let at = attempt.started_ns;
                        seen = Some(seen.map_or(at, |s| s.min(at)));
                    }
                }
            }
        }
        if let Some(at) = seen
            && in_flight.iter().all(|a| a.started_ns > at)
        {
            outcome.seen_at_ns = at;
            return Ok(Some(outcome));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
    }
}

/// Reads `open ADDR [DEADLINE_MS]` or `closed ADDR [DEADLINE_MS]` lines on stdin. For each it
/// prints `probing` once its first connection attempt is out (the bench then makes its
/// change), then `ok <attempts> <timeouts> <seen_at_ns>` when the wanted state is seen
/// ([`probe_until`]), or `timeout` after the deadline (default 10 s).
///
/// The time reported is when the first attempt seeing the change started, not when the probe
/// could tell: an attempt to a removed service can take its whole timeout to be known
/// unanswered (the node's ICMP "unreachable" for the service range is rate-limited per source
/// to about one a second, net/ipv4/route.c, ip_error), but it already met the new datapath
/// when it started. So the figure is the datapath's, to within the attempts' cadence.
pub fn probe() -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::cell::RefCell::new(std::io::stdout());
    for line in stdin.lock().lines() {
        let line = line.context("reading a probe request")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let [want, address, rest @ ..] = &words[..] else { continue };
        let target: SocketAddrV4 =
            address.parse().with_context(|| format!("probe address {address:?}"))?;
        let deadline_ms = rest.first().and_then(|ms| ms.parse().ok()).unwrap_or(10_000);
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        let mut started = || {
            let mut out = stdout.borrow_mut();
            writeln!(out, "probing")?;
            out.flush()
        };
        let outcome = probe_until(target, *want == "open", deadline, &mut started)?;
        let mut out = stdout.borrow_mut();
        match outcome {
            Some(o) => writeln!(out, "ok {} {} {}", o.attempts, o.timeouts, o.seen_at_ns)?,
            None => writeln!(out, "timeout")?,
        }
        out.flush()?;
    }
    Ok(())
}

/// Options of the agent stand-in ([`agent_services`]).
pub struct AgentServicesOptions {
    /// The node's pin directory, whose load-balancing maps are adopted.
    pub pin_dir: std::path::PathBuf,
    /// VIP of service 0; service `i` has this address plus `i`.
    pub first_vip: Ipv4Addr,
    pub service_port: u16,
    /// Endpoints to give the services, the first M of them.
    pub backends: Vec<SocketAddrV4>,
}

/// The services as the node agent receives them from the controller.
fn bench_service(options: &AgentServicesOptions, index: usize, endpoints: usize) -> ServiceState {
    ServiceState {
        namespace: "bench".into(),
        name: format!("svc-{index}"),
        cluster_ip: Ipv4Addr::from(u32::from(options.first_vip) + index as u32).to_string(),
        ports: vec![ServicePort {
            name: String::new(),
            protocol: "TCP".into(),
            port: u32::from(options.service_port),
        }],
        endpoints: options.backends[..endpoints.min(options.backends.len())]
            .iter()
            .map(|backend| Endpoint {
                address: backend.ip().to_string(),
                node_name: "node-b".into(),
                ready: true,
                serving: true,
                terminating: false,
                ports: vec![EndpointPort {
                    name: String::new(),
                    protocol: "TCP".into(),
                    port: u32::from(backend.port()),
                }],
            })
            .collect(),
        ..Default::default()
    }
}

fn own_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with(field))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn memory_line(fields: serde_json::Value) -> serde_json::Value {
    let mut fields = fields;
    fields["rss_kib"] = own_status_kib("VmRSS:").into();
    fields["hwm_kib"] = own_status_kib("VmHWM:").into();
    fields
}

/// What the programming thread reports after each batch.
struct BatchDone {
    report_errors: usize,
    written: usize,
    removed: usize,
    /// When the batch's maps were written (the DNS zone comes after).
    applied_at: Instant,
    /// CPU time of the programming thread for the batch's `apply`.
    apply_cpu_seconds: f64,
    programmed_rss_kib: u64,
    zone_seconds: f64,
}

/// Holds and programs services as the node agent does, with the agent's own parts: the
/// NodeSync follower's state ([`DesiredState`]), which turns each stream message into a
/// change, and the programming thread ([`run_programmer`]: planner and map writer) fed the
/// [`ServiceUpdate`] the agent builds from that change, rebuilding the cluster DNS zone after
/// each batch as the agent does. Only the gRPC stream and the agent's other duties are left
/// out. Commands on stdin, one JSON answer per line on stdout (with the process' RSS and peak
/// RSS):
/// - at start: `{"ready":true,…}`;
/// - `program N M`: a snapshot of services 0..N with M endpoints each; answers how long the
///   programming thread took to write the maps, its CPU time, and the zone rebuild after it;
/// - `add I M` / `remove I`: one service added or removed, as one delta;
/// - `clear`: an empty snapshot (every frontend removed).
pub fn agent_services(options: &AgentServicesOptions) -> anyhow::Result<()> {
    use strait_dataplane::{
        agent::services::{LocalNode, ServicePrograms, ServiceUpdate, run_programmer, update_zone},
        dns::DnsZone,
        ebpf::lb::{LbMapSizes, ServiceLb},
    };
    const DOMAIN: &str = "cluster.local";
    let lb = ServiceLb::load_and_pin(&options.pin_dir, &LbMapSizes::default())
        .context("adopting the load-balancing maps")?;
    let node = LocalNode { name: "node-a".into(), cluster_dns: None, dns_server: None };
    let programs = std::sync::Mutex::new(ServicePrograms::new(lb, node));
    let (updates, batches) = std::sync::mpsc::channel::<ServiceUpdate>();
    let (done_sender, done) = std::sync::mpsc::channel::<BatchDone>();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let programs = &programs;
        scope.spawn(move || {
            let mut zone = DnsZone::new(DOMAIN, []).expect("a valid cluster domain");
            // What the DNS server would answer from: a clone published after each batch.
            let mut published = std::sync::Arc::new(zone.clone());
            let mut cpu_after_last = thread_cpu_seconds();
            run_programmer(programs, batches, |report, batch, all, _| {
                let (applied_at, cpu) = (Instant::now(), thread_cpu_seconds());
                let programmed_rss_kib = own_status_kib("VmRSS:");
                // As the agent does after every batch (dataplane/src/agent/mod.rs).
                update_zone(&mut zone, batch, all);
                published = std::sync::Arc::new(zone.clone());
                let zone_seconds = applied_at.elapsed().as_secs_f64();
                let _ = done_sender.send(BatchDone {
                    report_errors: report.errors,
                    written: report.frontends_written,
                    removed: report.frontends_removed,
                    applied_at,
                    apply_cpu_seconds: cpu - cpu_after_last,
                    programmed_rss_kib,
                    zone_seconds,
                });
                cpu_after_last = thread_cpu_seconds();
            });
            drop((zone, published));
        });
        let result = serve_agent_commands(options, &updates, &done);
        // The programming thread ends once its channel closes.
        drop(updates);
        result
    })?;
    Ok(())
}

fn serve_agent_commands(
    options: &AgentServicesOptions,
    updates: &std::sync::mpsc::Sender<strait_dataplane::agent::services::ServiceUpdate>,
    done: &std::sync::mpsc::Receiver<BatchDone>,
) -> anyhow::Result<()> {
    use strait_controlplane::nodesync_proto::NodeStateUpdate;
    use strait_dataplane::agent::{services::ServiceUpdate, sync::DesiredState};
    let mut state = DesiredState::default();
    let mut stdout = std::io::stdout();
    let mut answer = |value: serde_json::Value| -> anyhow::Result<()> {
        writeln!(stdout, "{}", memory_line(value))?;
        Ok(stdout.flush()?)
    };
    answer(serde_json::json!({ "ready": true }))?;
    for (revision, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("reading a command")?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| -> anyhow::Result<usize> {
            words.get(i).context("a number is missing")?.parse().context("not a number")
        };
        let mut message = NodeStateUpdate { revision: revision as u64 + 1, ..Default::default() };
        match words.first().copied() {
            Some("program") => {
                let (count, endpoints) = (number(1)?, number(2)?);
                message.snapshot = true;
                message.services_upserted =
                    (0..count).map(|i| bench_service(options, i, endpoints)).collect();
            }
            Some("add") => {
                message.services_upserted = vec![bench_service(options, number(1)?, number(2)?)]
            }
            Some("remove") => message.services_removed = vec![format!("bench/svc-{}", number(1)?)],
            Some("clear") => message.snapshot = true,
            _ => anyhow::bail!("unknown command {line:?}"),
        }
        let change = state.apply(message).context("the follower ignored the update")?;
        let received_rss_kib = own_status_kib("VmRSS:");
        // What the agent sends its programming thread for a change (agent/mod.rs).
        let keys: Vec<&String> = if change.snapshot {
            state.services.keys().collect()
        } else {
            change.services_upserted.iter().collect()
        };
        let update = ServiceUpdate {
            snapshot: change.snapshot,
            upserted: keys.into_iter().filter_map(|key| state.services.get(key).cloned()).collect(),
            removed: change.services_removed.clone(),
        };
        let sent = Instant::now();
        updates.send(update).context("the programming thread is gone")?;
        let batch = done.recv().context("the programming thread is gone")?;
        ensure!(batch.report_errors == 0, "{line}: {} frontends failed", batch.report_errors);
        answer(serde_json::json!({
            "apply_ms": batch.applied_at.duration_since(sent).as_secs_f64() * 1e3,
            "apply_cpu_ms": batch.apply_cpu_seconds * 1e3,
            "dns_zone_ms": batch.zone_seconds * 1e3,
            "state_rss_kib": received_rss_kib,
            "programmed_rss_kib": batch.programmed_rss_kib,
            "frontends_written": batch.written,
            "frontends_removed": batch.removed,
        }))?;
    }
    Ok(())
}
