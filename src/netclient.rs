//! `strait netclient`, the test client paired with `strait netexec`: it runs in whatever network
//! namespace and cgroup it was started in (so socket hooks and tc programs see a real
//! application) and prints one JSON object on stdout.
//!
//! - `tcp`: N new connections, each one `GET <path>` (HTTP/1.0) against netexec's HTTP port;
//!   counts the answers, the errors by kind (a refusal apart from a timeout, with the longest
//!   time a refusal took), and the connections whose `getpeername()` was not the target.
//! - `udp`: N `hostname` datagrams from one unconnected socket; records who answered, from
//!   which source address, and when.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use serde::Serialize;

/// Options of `netclient tcp`.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    pub target: SocketAddrV4,
    pub count: u32,
    /// Connections held open at once: each new one closes the oldest beyond this many.
    pub keep: u32,
    pub path: String,
    pub timeout: Duration,
    /// Connect from this local port every time (0: any). The server closes first, so the port
    /// is free again at once.
    pub source_port: u16,
    /// Pause between two connections.
    pub interval: Duration,
}

/// Options of `netclient udp`.
#[derive(Clone, Debug)]
pub struct UdpOptions {
    pub target: SocketAddrV4,
    pub count: u32,
    pub source_port: u16,
    pub interval: Duration,
    pub timeout: Duration,
}

/// What `netclient tcp` prints.
#[derive(Debug, Default, Serialize)]
pub struct TcpReport {
    /// Answer body → connections that got it.
    pub answers: BTreeMap<String, u32>,
    /// Error kind (`refused`, `timeout`, `reset`, `unreachable`, `other`) → connections.
    pub errors: BTreeMap<String, u32>,
    /// The longest a refused connect() took, in milliseconds.
    pub refused_max_ms: f64,
    /// Connections whose `getpeername()` was not the target.
    pub peer_mismatches: u32,
    pub elapsed_ms: f64,
}

/// One answered datagram of `netclient udp`.
#[derive(Debug, Serialize)]
pub struct UdpReply {
    /// Milliseconds since the client started.
    pub at_ms: f64,
    pub answer: String,
    /// The reply's source address as the socket reports it.
    pub source: String,
}

/// What `netclient udp` prints.
#[derive(Debug, Default, Serialize)]
pub struct UdpReport {
    pub answers: BTreeMap<String, u32>,
    /// Source address of the replies → count.
    pub sources: BTreeMap<String, u32>,
    pub errors: BTreeMap<String, u32>,
    pub replies: Vec<UdpReply>,
}

fn error_kind(error: &io::Error) -> &'static str {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        _ => "other",
    }
}

fn empty_errors() -> BTreeMap<String, u32> {
    ["refused", "timeout", "reset", "unreachable", "other"]
        .into_iter()
        .map(|k| (k.to_owned(), 0))
        .collect()
}

/// Makes the connections one after the other.
pub fn tcp(options: &TcpOptions) -> TcpReport {
    let started = Instant::now();
    let mut report = TcpReport { errors: empty_errors(), ..Default::default() };
    let mut open = VecDeque::new();
    let target = SocketAddr::V4(options.target);
    for n in 0..options.count {
        // Also after a failed connection, so that a refusing target is not flooded.
        if n > 0 && !options.interval.is_zero() {
            std::thread::sleep(options.interval);
        }
        let connecting = Instant::now();
        let stream = match connect_from(options.source_port, target, options.timeout) {
            Ok(stream) => stream,
            Err(error) => {
                let kind = error_kind(&error);
                if kind == "refused" {
                    let ms = connecting.elapsed().as_secs_f64() * 1000.0;
                    report.refused_max_ms = report.refused_max_ms.max(ms);
                }
                *report.errors.entry(kind.to_owned()).or_default() += 1;
                continue;
            }
        };
        if stream.peer_addr().ok() != Some(target) {
            report.peer_mismatches += 1;
        }
        match request(&stream, &options.path, options.timeout) {
            Ok(answer) => *report.answers.entry(answer).or_default() += 1,
            Err(error) => *report.errors.entry(error_kind(&error).to_owned()).or_default() += 1,
        }
        open.push_back(stream);
        while open.len() > options.keep as usize {
            open.pop_front();
        }
    }
    report.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    report
}

/// Connects to `target`, from `source_port` when it is not 0.
fn connect_from(source_port: u16, target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    if source_port == 0 {
        return TcpStream::connect_timeout(&target, timeout);
    }
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, source_port)).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

/// One HTTP/1.0 GET; returns the body. The server closes the connection after answering.
fn request(mut stream: &TcpStream, path: &str, timeout: Duration) -> io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: netexec\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of HTTP headers"))?;
    if !head.starts_with("HTTP/1.") || head.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, head.to_owned()));
    }
    Ok(body.trim().to_owned())
}

/// Sends the datagrams from one socket, waiting for each answer before the next.
pub fn udp(options: &UdpOptions) -> io::Result<UdpReport> {
    let started = Instant::now();
    let mut report = UdpReport { errors: empty_errors(), ..Default::default() };
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, options.source_port))?;
    socket.set_read_timeout(Some(options.timeout))?;
    let mut buffer = [0u8; 1500];
    for n in 0..options.count {
        if n > 0 {
            std::thread::sleep(options.interval);
        }
        if let Err(error) = socket.send_to(b"hostname", options.target) {
            *report.errors.entry(error_kind(&error).to_owned()).or_default() += 1;
            continue;
        }
        match socket.recv_from(&mut buffer) {
            Ok((len, source)) => {
                let answer = String::from_utf8_lossy(&buffer[..len]).trim().to_owned();
                *report.answers.entry(answer.clone()).or_default() += 1;
                *report.sources.entry(source.to_string()).or_default() += 1;
                report.replies.push(UdpReply {
                    at_ms: started.elapsed().as_secs_f64() * 1000.0,
                    answer,
                    source: source.to_string(),
                });
            }
            Err(error) => {
                *report.errors.entry(error_kind(&error).to_owned()).or_default() += 1;
            }
        }
    }
    Ok(report)
}

/// Options of `netclient echo`: one large request through one connection and one datagram.
#[derive(Clone, Debug)]
pub struct EchoOptions {
    pub http: SocketAddrV4,
    pub udp: SocketAddrV4,
    pub http_bytes: usize,
    pub udp_bytes: usize,
    pub timeout: Duration,
}

/// What `netclient echo` prints: whether each payload came back byte for byte.
#[derive(Debug, Default, Serialize)]
pub struct EchoReport {
    pub http_sent: usize,
    pub http_echoed: usize,
    pub http_intact: bool,
    pub udp_sent: usize,
    pub udp_echoed: usize,
    pub udp_intact: bool,
    pub udp_source: String,
    pub errors: Vec<String>,
}

/// A payload no two positions of which are likely to be confused: a byte count in a
/// repeating pattern, so truncation and reordering both show.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 23) as u8 + ((i / 23) % 3) as u8).collect()
}

/// Sends `http_bytes` through `POST /echo` and a `udp_bytes` datagram, and checks both echoes.
pub fn echo(options: &EchoOptions) -> EchoReport {
    let mut report = EchoReport {
        http_sent: options.http_bytes,
        udp_sent: options.udp_bytes,
        ..Default::default()
    };
    let body = payload(options.http_bytes);
    let http = (|| -> io::Result<Vec<u8>> {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::V4(options.http), options.timeout)?;
        stream.set_read_timeout(Some(options.timeout))?;
        write!(
            stream,
            "POST /echo HTTP/1.0\r\nHost: netexec\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        stream.write_all(&body)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of HTTP headers"))?;
        Ok(response[split + 4..].to_vec())
    })();
    match http {
        Ok(echoed) => {
            report.http_echoed = echoed.len();
            report.http_intact = echoed == body;
        }
        Err(error) => report.errors.push(format!("http: {error}")),
    }
    let datagram = payload(options.udp_bytes);
    let udp = (|| -> io::Result<(Vec<u8>, SocketAddr)> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        socket.set_read_timeout(Some(options.timeout))?;
        socket.send_to(&datagram, options.udp)?;
        let mut buffer = vec![0u8; 65_536];
        let (len, source) = socket.recv_from(&mut buffer)?;
        buffer.truncate(len);
        Ok((buffer, source))
    })();
    match udp {
        Ok((echoed, source)) => {
            report.udp_echoed = echoed.len();
            report.udp_intact = echoed == datagram;
            report.udp_source = source.to_string();
        }
        Err(error) => report.errors.push(format!("udp: {error}")),
    }
    report
}

/// Options of `netclient hold`.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    pub target: SocketAddrV4,
    /// Long-lived connections opened first and used until the end.
    pub connections: u32,
    pub duration: Duration,
    /// A new short connection this often, all along.
    pub new_every: Duration,
    pub timeout: Duration,
    /// What each new connection asks for.
    pub path: String,
}

/// What `netclient hold` prints.
#[derive(Debug, Default, Serialize)]
pub struct HoldReport {
    /// Long-lived connections that were established.
    pub established: u32,
    /// Requests answered on the long-lived connections.
    pub established_requests: u64,
    /// Long-lived connections that broke (an error or a closed connection) after establishing.
    pub established_broken: u32,
    pub new_ok: u32,
    /// New connections that failed, by error kind.
    pub new_failed: BTreeMap<String, u32>,
    /// The longest run of consecutive failed new connections, in milliseconds.
    pub new_longest_outage_ms: f64,
    /// The answers of the new connections in the order they came, as runs of one answer
    /// (`[["v1", 120], ["v2", 3], ["v1", 1], ["v2", 300]]`): how the answers switched.
    pub new_answer_runs: Vec<(String, u32)>,
}

/// One keep-alive request on an HTTP/1.1 connection; the body of `/hostname` is short, so the
/// response is read until its announced length.
fn keep_alive_request(stream: &mut TcpStream) -> io::Result<()> {
    stream.write_all(b"GET /hostname HTTP/1.1\r\nHost: netexec\r\n\r\n")?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        response.extend_from_slice(&buffer[..n]);
        let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))?;
        if !head.starts_with("http/1.1 200") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, head));
        }
        if response.len() >= split + 4 + length {
            return Ok(());
        }
    }
}

/// Opens the long-lived connections, then for `duration` keeps using every one of them while
/// opening new short ones: what a service's clients look like while its node agent restarts.
pub fn hold(options: &HoldOptions) -> HoldReport {
    let mut report = HoldReport::default();
    let target = SocketAddr::V4(options.target);
    let mut held: Vec<Option<TcpStream>> = Vec::new();
    for _ in 0..options.connections {
        let stream = TcpStream::connect_timeout(&target, options.timeout).and_then(|mut s| {
            s.set_read_timeout(Some(options.timeout))?;
            s.set_write_timeout(Some(options.timeout))?;
            keep_alive_request(&mut s)?;
            Ok(s)
        });
        if let Ok(stream) = stream {
            report.established += 1;
            held.push(Some(stream));
        }
    }
    let started = Instant::now();
    let mut next_new = Instant::now();
    let mut outage_started: Option<Instant> = None;
    let mut index = 0;
    while started.elapsed() < options.duration {
        let slots = held.len().max(1);
        if let Some(slot) = held.get_mut(index % slots)
            && let Some(stream) = slot
        {
            match keep_alive_request(stream) {
                Ok(()) => report.established_requests += 1,
                Err(_) => {
                    report.established_broken += 1;
                    *slot = None;
                }
            }
        }
        index += 1;
        if Instant::now() >= next_new {
            next_new += options.new_every;
            let result = TcpStream::connect_timeout(&target, options.timeout)
                .and_then(|stream| request(&stream, &options.path, options.timeout));
            match result {
                Ok(answer) => {
                    report.new_ok += 1;
                    match report.new_answer_runs.last_mut() {
                        Some((last, count)) if *last == answer => *count += 1,
                        _ => report.new_answer_runs.push((answer, 1)),
                    }
                    if let Some(since) = outage_started.take() {
                        let ms = since.elapsed().as_secs_f64() * 1000.0;
                        report.new_longest_outage_ms = report.new_longest_outage_ms.max(ms);
                    }
                }
                Err(error) => {
                    *report.new_failed.entry(error_kind(&error).to_owned()).or_default() += 1;
                    outage_started.get_or_insert_with(Instant::now);
                }
            }
        }
        if held.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if let Some(since) = outage_started {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        report.new_longest_outage_ms = report.new_longest_outage_ms.max(ms);
    }
    report
}

/// What `netclient dns` prints: the response code and the A records of one query.
#[derive(Debug, Default, Serialize)]
pub struct DnsReport {
    /// `NoError`, `NXDomain`, … or empty when no answer came.
    pub rcode: String,
    pub addresses: Vec<String>,
    pub error: Option<String>,
}

/// Asks `server` for the A records of `name` over UDP, or over TCP (RFC 1035, 4.2.2: each
/// message preceded by its two-byte length).
pub fn dns(server: SocketAddrV4, name: &str, tcp: bool, timeout: Duration) -> DnsReport {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let exchange = || -> Result<Message, Box<dyn std::error::Error>> {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
        let bytes = query.to_vec()?;
        let answer = if tcp {
            let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(server), timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.write_all(&u16::try_from(bytes.len())?.to_be_bytes())?;
            stream.write_all(&bytes)?;
            let mut length = [0u8; 2];
            stream.read_exact(&mut length)?;
            let mut buffer = vec![0u8; usize::from(u16::from_be_bytes(length))];
            stream.read_exact(&mut buffer)?;
            buffer
        } else {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(timeout))?;
            socket.send_to(&bytes, server)?;
            let mut buffer = vec![0u8; 4096];
            let (len, _) = socket.recv_from(&mut buffer)?;
            buffer.truncate(len);
            buffer
        };
        let answer = Message::from_vec(&answer)?;
        if answer.metadata.id != query.metadata.id {
            return Err("the answer's id is not the query's".into());
        }
        Ok(answer)
    };
    match exchange() {
        Ok(answer) => DnsReport {
            rcode: format!("{:?}", answer.metadata.response_code),
            addresses: answer
                .answers
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect(),
            error: None,
        },
        Err(error) => DnsReport { error: Some(error.to_string()), ..Default::default() },
    }
}
