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
    for _ in 0..options.count {
        let connecting = Instant::now();
        let stream = match TcpStream::connect_timeout(&target, options.timeout) {
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
