//! `kubectl exec` on the node: `GET|POST /exec/{namespace}/{pod}/{container}?command=..`
//! (kubelet's path and query), served beside the log server to the API server alone.
//!
//! The request is upgraded to a WebSocket speaking Kubernetes' remote command protocol
//! (`v5.channel.k8s.io`, else `v4`; see `streaming/remotecommand.rs`), or to SPDY/3.1 with
//! `v4.channel.k8s.io` (kubectl 1.29 and older; see `streaming/spdy`). The command runs as the
//! container's exec probes run: in the pod's network namespace, the container's cgroup and
//! mount namespace, with the pod's hostname and the environment the container started with.
//! With a TTY (`kubectl exec -it`) the command's streams are a pseudo-terminal of its own,
//! its controlling terminal, whose window follows the client's resize messages
//! (`streaming/terminal.rs`); stdout and stderr then arrive together on stdout, as kubelet
//! sends them.

use std::{collections::HashMap, path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    extract::{Path, RawQuery, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use strait_controlplane::{api::http::flag, auth::https::ConnectionIdentity};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    process::Child,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use super::log_server::{Refusal, check_client, text};
use crate::{
    runtime::{
        RuntimeContext,
        process::{ChildSetup, is_same_process_alive, resolve_program},
    },
    streaming::{
        remotecommand::{self, ClientMessage, Outcome},
        spdy::{IncomingStream, SpdyConnection, header_block::header as spdy_header},
        terminal::{self, Terminal},
        websocket::{
            MessageAssembler, Opcode, WsError, WsFrame, WsMessage, accept_key, close_code,
        },
    },
};

/// The most of stdout or stderr sent in one message.
const CHUNK: usize = 32 * 1024;
/// Frames waiting to be written to the client.
const FRAMES_IN_FLIGHT: usize = 16;

/// The runtime, once the agent has made it (exec requests before then are refused).
#[derive(Clone)]
pub struct ExecState {
    pub runtime: watch::Receiver<Option<Arc<RuntimeContext>>>,
}

pub fn router(state: ExecState) -> Router {
    Router::new()
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .with_state(state)
}

/// kubelet's exec query: `command` repeated, one per argument.
#[derive(Debug, Default, PartialEq, Eq)]
struct ExecOptions {
    command: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
    pod_uid: Option<String>,
}

impl ExecOptions {
    fn parse(query: &str) -> Self {
        let mut options = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "command" => options.command.push(value.into_owned()),
                "input" | "stdin" => options.stdin = flag(Some(&value)),
                "output" | "stdout" => options.stdout = flag(Some(&value)),
                "error" | "stderr" => options.stderr = flag(Some(&value)),
                "tty" => options.tty = flag(Some(&value)),
                "podUID" => options.pod_uid = Some(value.into_owned()),
                _ => {}
            }
        }
        options
    }
}

/// Where and how the command runs: what an exec probe gets (see `probe.rs`).
#[derive(Debug)]
struct ExecTarget {
    netns_path: PathBuf,
    cgroup_procs: PathBuf,
    mount_namespace: PathBuf,
    hostname: String,
    env: Vec<(String, String)>,
}

async fn exec(
    State(state): State<ExecState>,
    identity: Option<Extension<ConnectionIdentity>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    mut request: Request,
) -> Response {
    if let Err(refusal) = check_client(identity) {
        return refusal.into_response();
    }
    let options = ExecOptions::parse(query.as_deref().unwrap_or_default());
    if options.command.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "you must specify at least one command for the container".into(),
        );
    }
    if is_spdy_upgrade(request.headers()) {
        return spdy_exec(&state, &namespace, &pod, &container, options, request);
    }
    let protocol = match websocket_protocol(request.headers()) {
        Ok(protocol) => protocol,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(key) = request.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()) else {
        return text(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs Sec-WebSocket-Key".into());
    };
    let accept = accept_key(key);
    let Some(context) = state.runtime.borrow().clone() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the node's runtime is starting".into());
    };
    let target = match find_target(&context, &namespace, &pod, &container, &options) {
        Ok(target) => target,
        Err(refusal) => return refusal.into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => session(TokioIo::new(upgraded), protocol, target, options).await,
            Err(error) => tracing::debug!(%error, "an exec upgrade did not complete"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, "websocket".to_owned()),
            (header::CONNECTION, "Upgrade".to_owned()),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
            (header::SEC_WEBSOCKET_PROTOCOL, protocol.to_owned()),
        ],
    )
        .into_response()
}

/// The remote command protocol the client's WebSocket upgrade asks for, or why it is refused.
fn websocket_protocol(headers: &HeaderMap) -> Result<&'static str, Refusal> {
    let upgrade =
        headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default().trim();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "exec needs a WebSocket upgrade (v5.channel.k8s.io)".into(),
        ));
    }
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    remotecommand::choose_protocol(&offered.join(",")).ok_or_else(|| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "none of the offered subprotocols {offered:?} is served: {} or {}",
                remotecommand::PROTOCOL_V5,
                remotecommand::PROTOCOL_V4
            ),
        )
    })
}

fn is_spdy_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(SPDY_UPGRADE))
}

/// What SPDY clients ask to upgrade to (kubectl 1.29 and older, and newer ones falling back).
const SPDY_UPGRADE: &str = "SPDY/3.1";
const STREAM_PROTOCOL_VERSION: &str = "x-stream-protocol-version";
/// How long a SPDY client has to open the streams it asked for.
const SPDY_STREAMS_TIMEOUT: Duration = Duration::from_secs(30);

/// The SPDY upgrade: `v4.channel.k8s.io` (its error stream carries the v1 `Status`), one
/// stream per standard stream, each opened by the client with its `streamType`.
fn spdy_exec(
    state: &ExecState,
    namespace: &str,
    pod: &str,
    container: &str,
    options: ExecOptions,
    mut request: Request,
) -> Response {
    let offered: Vec<String> = request
        .headers()
        .get_all(STREAM_PROTOCOL_VERSION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()))
        .collect();
    if !offered.iter().any(|p| p == remotecommand::PROTOCOL_V4) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "none of the offered stream protocols {offered:?} is served: {}",
                remotecommand::PROTOCOL_V4
            ),
        );
    }
    let Some(context) = state.runtime.borrow().clone() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the node's runtime is starting".into());
    };
    let target = match find_target(&context, namespace, pod, container, &options) {
        Ok(target) => target,
        Err(refusal) => return refusal.into_response(),
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => spdy_session(TokioIo::new(upgraded), target, options).await,
            Err(error) => tracing::debug!(%error, "an exec upgrade did not complete"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, SPDY_UPGRADE),
            (header::CONNECTION, "Upgrade"),
            (header::HeaderName::from_static(STREAM_PROTOCOL_VERSION), remotecommand::PROTOCOL_V4),
        ],
    )
        .into_response()
}

/// One exec over SPDY: the client opens an error stream and one stream per standard stream
/// asked for; output goes out on its stream, stdin comes in until the client's FIN, and the
/// exit status is written to the error stream before every stream is finished.
async fn spdy_session(
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    target: ExecTarget,
    options: ExecOptions,
) {
    let mut connection = SpdyConnection::serve(io);
    // A TTY adds the resize stream.
    let expected = 1
        + usize::from(options.stdin)
        + usize::from(options.stdout)
        + usize::from(options.stderr)
        + usize::from(options.tty);
    let mut streams: HashMap<String, IncomingStream> = HashMap::new();
    let opened = tokio::time::timeout(SPDY_STREAMS_TIMEOUT, async {
        while streams.len() < expected {
            let Some(stream) = connection.streams.recv().await else { return false };
            let kind = spdy_header(&stream.headers, "streamtype").unwrap_or_default().to_owned();
            streams.insert(kind, stream);
        }
        true
    })
    .await;
    let Some(error_stream) = streams.remove("error").filter(|_| opened == Ok(true)) else {
        tracing::debug!(opened = ?streams.keys().collect::<Vec<_>>(), "a SPDY exec client did not open its streams");
        connection.close(Duration::from_secs(1)).await;
        return;
    };
    let sender = connection.sender.clone();
    let finish = |outcome: Outcome| {
        let status = remotecommand::status_json(&outcome);
        let _ = sender.send(error_stream.id, Bytes::from(status));
        let _ = sender.finish(error_stream.id);
    };
    let mut started = match spawn_command(&target, &options) {
        Ok(started) => started,
        Err(message) => {
            for stream in streams.values() {
                let _ = sender.finish(stream.id);
            }
            finish(Outcome::Failed(message));
            connection.close(SPDY_CLOSE_TIMEOUT).await;
            return;
        }
    };
    if let (Some(mut incoming), Some(terminal)) = (streams.remove("resize"), &started.terminal) {
        let terminal = Arc::clone(terminal);
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(data) = incoming.data.recv().await {
                for size in terminal::take_sizes(&mut pending, &data) {
                    if let Err(error) = terminal.resize(size) {
                        tracing::debug!(%error, "resizing an exec terminal");
                    }
                }
            }
        });
    }
    let stdin_stream = streams.remove("stdin");
    if let (Some(mut incoming), Some(mut pipe)) = (stdin_stream, started.input(&options)) {
        let sender = sender.clone();
        tokio::spawn(async move {
            while let Some(data) = incoming.data.recv().await {
                if pipe.write_all(&data).await.is_err() {
                    break;
                }
            }
            // The client's FIN: the command sees the end of its input.
            drop(pipe);
            let _ = sender.finish(incoming.id);
        });
    }
    let spdy_pump = |output: Option<Output>, stream: Option<u32>| {
        let sender = sender.clone();
        tokio::spawn(async move {
            let Some(mut output) = output else { return };
            let mut buffer = vec![0u8; CHUNK];
            // Without a stream for it (a terminal's output nobody asked for) it is read all
            // the same, so that the command never waits on a full buffer.
            while let Ok(read @ 1..) = output.read(&mut buffer).await {
                if let Some(id) = stream
                    && sender.send(id, Bytes::copy_from_slice(&buffer[..read])).is_err()
                {
                    return;
                }
            }
            if let Some(id) = stream {
                let _ = sender.finish(id);
            }
        })
    };
    let (stdout, stderr) = started.outputs();
    let pumps = [
        spdy_pump(stdout, streams.get("stdout").map(|s| s.id)),
        spdy_pump(stderr, streams.get("stderr").map(|s| s.id)),
    ];
    let abort = pumps.each_ref().map(JoinHandle::abort_handle);
    let has_terminal = started.terminal.is_some();
    let mut child = started.child;
    let ended = async {
        let status = child.wait().await;
        output_done(pumps, has_terminal).await;
        status
    };
    // The connection's reader drops its stream queue when the client goes away.
    let gone = async { while connection.streams.recv().await.is_some() {} };
    tokio::select! {
        status = ended => {
            finish(match status {
                Ok(status) => Outcome::Exited(exit_code(status)),
                Err(error) => Outcome::Failed(format!("waiting for the command: {error}")),
            });
        }
        () = gone => {
            end_session(&mut child).await;
            abort.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
    drop(sender);
    connection.close(SPDY_CLOSE_TIMEOUT).await;
}

/// How long the client has to close the connection once everything is sent.
const SPDY_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The running container's namespaces, cgroup and environment, from the node's pod record
/// and the container's process.
fn find_target(
    context: &RuntimeContext,
    namespace: &str,
    pod: &str,
    container: &str,
    options: &ExecOptions,
) -> Result<ExecTarget, Refusal> {
    let records = context.records.load_all().map_err(|error| {
        Refusal(StatusCode::INTERNAL_SERVER_ERROR, format!("reading the pod records: {error}"))
    })?;
    let record = records
        .into_iter()
        .find(|r| {
            r.namespace == namespace
                && r.name == pod
                && options.pod_uid.as_ref().is_none_or(|uid| *uid == r.uid)
        })
        .ok_or_else(|| {
            Refusal(StatusCode::NOT_FOUND, format!("pod {namespace}/{pod} is not on this node"))
        })?;
    let not_running = || {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("container {container:?} in pod {pod:?} is not running"),
        )
    };
    let running = record.containers.get(container).ok_or_else(not_running)?;
    let pid = running.pid.ok_or_else(not_running)?;
    if !is_same_process_alive(pid, running.start_ticks) {
        return Err(not_running());
    }
    let env = std::fs::read(format!("/proc/{pid}/environ"))
        .map(|bytes| parse_environ(&bytes))
        .map_err(|_| not_running())?;
    Ok(ExecTarget {
        netns_path: crate::netns::named_path(&record.netns),
        cgroup_procs: context.pod_cgroup(&record.uid).child(container).procs_file(),
        mount_namespace: PathBuf::from(format!("/proc/{pid}/ns/mnt")),
        hostname: record.name.clone(),
        env,
    })
}

/// `/proc/<pid>/environ`: `KEY=value` entries ended by NUL bytes.
fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (key, value) = entry.split_once('=')?;
            (!key.is_empty()).then(|| (key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// What the command reads, and what it writes.
type Input = Box<dyn AsyncWrite + Unpin + Send>;
type Output = Box<dyn AsyncRead + Unpin + Send>;

/// A started command and its streams.
struct Started {
    child: Child,
    /// With a TTY: the terminal its streams are on.
    terminal: Option<Arc<Terminal>>,
}

impl Started {
    /// Where the client's stdin goes, if it sends any.
    fn input(&mut self, options: &ExecOptions) -> Option<Input> {
        match &self.terminal {
            Some(terminal) => options.stdin.then(|| Box::new(terminal.writer()) as Input),
            None => self.child.stdin.take().map(|pipe| Box::new(pipe) as Input),
        }
    }

    /// stdout and stderr; a terminal is read whether or not the client asked for its output,
    /// or the command would stop once its buffer is full.
    fn outputs(&mut self) -> (Option<Output>, Option<Output>) {
        match &self.terminal {
            Some(terminal) => (Some(Box::new(terminal.reader())), None),
            None => (
                self.child.stdout.take().map(|pipe| Box::new(pipe) as Output),
                self.child.stderr.take().map(|pipe| Box::new(pipe) as Output),
            ),
        }
    }
}

/// How long a terminal's output is read on once the command has ended: what it wrote is
/// there already, but a job it left in the background may hold the terminal for ever.
const TERMINAL_DRAIN: Duration = Duration::from_secs(1);

/// Waits for the output to be sent: pipes to their end (as long as any process holds them,
/// as kubelet does), a terminal for [`TERMINAL_DRAIN`] at most.
async fn output_done(pumps: [JoinHandle<()>; 2], terminal: bool) {
    let abort = pumps.each_ref().map(JoinHandle::abort_handle);
    let all = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    if !terminal {
        all.await;
    } else if tokio::time::timeout(TERMINAL_DRAIN, all).await.is_err() {
        abort.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Ends a command whose client went away, and what it started in its session. (Its pid
/// cannot be reused before it is reaped.)
async fn end_session(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill().await;
}

/// Starts the command where the container runs, with pipes for the streams asked for, or on
/// a terminal of its own.
fn spawn_command(target: &ExecTarget, options: &ExecOptions) -> Result<Started, String> {
    let program = &options.command[0];
    let path_var = target.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
    let resolved = resolve_program(program, path_var)
        .ok_or_else(|| format!("exec {program:?}: executable file not found in $PATH"))?;
    let mut setup = ChildSetup::new()
        .join_cgroup(&target.cgroup_procs)
        .map(ChildSetup::new_session)
        .and_then(|setup| setup.enter_netns(&target.netns_path))
        .and_then(|setup| setup.hostname(&target.hostname))
        .and_then(|setup| setup.join_mount_namespace(&target.mount_namespace))
        .map_err(|e| format!("exec {program:?}: preparing: {e}"))?;
    let mut command = tokio::process::Command::new(&resolved);
    command
        .args(&options.command[1..])
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    let terminal = if options.tty {
        let (terminal, side) =
            Terminal::open().map_err(|e| format!("exec {program:?}: opening a terminal: {e}"))?;
        let copy = || {
            side.try_clone()
                .map(Stdio::from)
                .map_err(|e| format!("exec {program:?}: opening a terminal: {e}"))
        };
        command.stdin(copy()?).stdout(copy()?).stderr(Stdio::from(side));
        setup = setup.controlling_terminal();
        Some(terminal)
    } else {
        let pipe_if = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        command
            .stdin(pipe_if(options.stdin))
            .stdout(pipe_if(options.stdout))
            .stderr(pipe_if(options.stderr));
        None
    };
    setup.install(command.as_std_mut());
    let child = command.spawn().map_err(|e| format!("exec {program:?}: {e}"))?;
    // `command` goes here with its copies of the terminal's side: the child holds the rest.
    Ok(Started { child, terminal })
}

/// One exec over an upgraded connection: the command's output out, stdin in, then its exit
/// status on the error channel and a normal close. A client that goes away first ends the
/// command and whatever it started (its session).
async fn session(
    io: impl AsyncRead + AsyncWrite + Send + 'static,
    protocol: &'static str,
    target: ExecTarget,
    options: ExecOptions,
) {
    let (reader, writer) = tokio::io::split(io);
    let (frames, outgoing) = mpsc::channel::<WsFrame>(FRAMES_IN_FLIGHT);
    let writing = tokio::spawn(write_frames(writer, outgoing));
    let finish = |frames: mpsc::Sender<WsFrame>, outcome: Outcome| async move {
        let status = remotecommand::status_json(&outcome);
        let message = remotecommand::channel_message(remotecommand::ERROR, &status);
        let _ = frames.send(WsFrame::message(Opcode::Binary, message)).await;
        let _ = frames.send(WsFrame::close(close_code::NORMAL, "")).await;
    };
    let mut started = match spawn_command(&target, &options) {
        Ok(started) => started,
        Err(message) => {
            finish(frames, Outcome::Failed(message)).await;
            let _ = writing.await;
            return;
        }
    };
    tracing::debug!(protocol, command = ?options.command, tty = options.tty, "exec started");
    let stdin = started.input(&options);
    let (stdout, stderr) = started.outputs();
    let pumps = [
        tokio::spawn(pump(stdout, remotecommand::STDOUT, frames.clone())),
        tokio::spawn(pump(stderr, remotecommand::STDERR, frames.clone())),
    ];
    let abort = pumps.each_ref().map(JoinHandle::abort_handle);
    let terminal = started.terminal.clone();
    let mut child = started.child;
    let ended = async {
        let status = child.wait().await;
        output_done(pumps, terminal.is_some()).await;
        status
    };
    let reading = read_client(reader, stdin, terminal.clone(), frames.clone());
    tokio::select! {
        status = ended => {
            let outcome = match status {
                Ok(status) => Outcome::Exited(exit_code(status)),
                Err(error) => Outcome::Failed(format!("waiting for the command: {error}")),
            };
            finish(frames, outcome).await;
        }
        () = reading => {
            // The client is gone: nobody reads the output.
            end_session(&mut child).await;
            abort.iter().for_each(tokio::task::AbortHandle::abort);
            drop(frames);
        }
    }
    let _ = writing.await;
}

/// The code kubectl exits with: the exit status, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().or_else(|| status.signal().map(|signal| 128 + signal)).unwrap_or(1)
}

/// Sends what `stream` yields on `channel` until it ends.
async fn pump(stream: Option<Output>, channel: u8, frames: mpsc::Sender<WsFrame>) {
    let Some(mut stream) = stream else { return };
    let mut buffer = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => {
                let message = remotecommand::channel_message(channel, &buffer[..read]);
                if frames.send(WsFrame::message(Opcode::Binary, message)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads the client's frames until it closes or goes: stdin to the command (closed when the
/// client closes its stdin channel), window sizes to its terminal, pings answered.
async fn read_client(
    mut reader: impl AsyncRead + Unpin,
    mut stdin: Option<Input>,
    terminal: Option<Arc<Terminal>>,
    frames: mpsc::Sender<WsFrame>,
) {
    let mut buffer = BytesMut::with_capacity(CHUNK);
    let mut assembler = MessageAssembler::default();
    loop {
        loop {
            let message = match next_message(&mut buffer, &mut assembler) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "an exec client broke the WebSocket protocol");
                    let _ = frames
                        .send(WsFrame::close(close_code::PROTOCOL_ERROR, &error.to_string()))
                        .await;
                    return;
                }
            };
            match message {
                WsMessage::Binary(payload) => match remotecommand::parse_client_message(&payload) {
                    Some(ClientMessage::Stdin(data)) => {
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(data).await.is_err()
                        {
                            // The command closed its stdin: the rest is not read.
                            stdin = None;
                        }
                    }
                    Some(ClientMessage::Close(remotecommand::STDIN)) => stdin = None,
                    Some(ClientMessage::Resize(data)) => {
                        let size = terminal.as_ref().zip(terminal::parse_size(data));
                        if let Some((terminal, size)) = size
                            && let Err(error) = terminal.resize(size)
                        {
                            tracing::debug!(%error, "resizing an exec terminal");
                        }
                    }
                    Some(ClientMessage::Close(_) | ClientMessage::Other(_)) | None => {}
                },
                WsMessage::Ping(payload) => {
                    let _ = frames.send(WsFrame::message(Opcode::Pong, payload)).await;
                }
                WsMessage::Text(_) | WsMessage::Pong(_) => {}
                WsMessage::Close(_) => return,
            }
        }
        match reader.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The next whole message or control frame in `buffer`; `None` until more is read.
fn next_message(
    buffer: &mut BytesMut,
    assembler: &mut MessageAssembler,
) -> Result<Option<WsMessage>, WsError> {
    while let Some(frame) = WsFrame::decode_client(buffer)? {
        if let Some(message) = assembler.push(frame)? {
            return Ok(Some(message));
        }
    }
    Ok(None)
}

/// Writes frames in order until a close frame is written or every sender is gone.
async fn write_frames(mut writer: impl AsyncWrite + Unpin, mut frames: mpsc::Receiver<WsFrame>) {
    let mut buffer = BytesMut::new();
    while let Some(frame) = frames.recv().await {
        buffer.clear();
        frame.encode_server(&mut buffer);
        if writer.write_all(&buffer).await.is_err() {
            return;
        }
        if frame.opcode == Opcode::Close {
            break;
        }
    }
    let _ = writer.flush().await;
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_gives_the_command_in_order_and_the_streams_asked_for() {
        let options = ExecOptions::parse(
            "command=sh&command=-c&command=echo+%22a+b%22%3B+exit+3&stdin=true&stdout=1&tty=false&podUID=u1",
        );
        assert_eq!(options.command, ["sh", "-c", "echo \"a b\"; exit 3"]);
        assert!(options.stdin && options.stdout && !options.stderr && !options.tty);
        assert_eq!(options.pod_uid.as_deref(), Some("u1"));
        // The older names of the same flags.
        let old = ExecOptions::parse("command=ls&input=1&output=1&error=1");
        assert!(old.stdin && old.stdout && old.stderr);
    }

    #[test]
    fn the_environment_is_read_as_the_kernel_lists_it() {
        let env = parse_environ(b"PATH=/bin:/usr/bin\0EMPTY=\0A=b=c\0broken\0\0");
        let expected = [("PATH", "/bin:/usr/bin"), ("EMPTY", ""), ("A", "b=c")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(env, expected);
    }

    fn client(frame: WsFrame) -> Vec<u8> {
        let mut wire = BytesMut::new();
        frame.encode_client([9, 8, 7, 6], &mut wire);
        wire.to_vec()
    }

    #[tokio::test]
    async fn stdin_reaches_the_command_until_the_client_closes_it_and_pings_are_answered() {
        let (mut to_agent, from_client) = tokio::io::duplex(1 << 16);
        let mut cat = tokio::process::Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cat");
        let (frames, mut sent) = mpsc::channel(8);
        let stdin = cat.stdin.take().map(|pipe| Box::new(pipe) as Input);
        let reading = tokio::spawn(read_client(from_client, stdin, None, frames));
        let mut wire = client(WsFrame::message(Opcode::Binary, &b"\x00hello "[..]));
        wire.extend(client(WsFrame::message(Opcode::Ping, &b"beat"[..])));
        // A stdin message in two fragments, then v5's close of stdin.
        wire.extend(client(WsFrame {
            fin: false,
            opcode: Opcode::Binary,
            payload: "\x00wor".into(),
        }));
        wire.extend(client(WsFrame {
            fin: true,
            opcode: Opcode::Continuation,
            payload: "ld".into(),
        }));
        wire.extend(client(WsFrame::message(Opcode::Binary, &[remotecommand::CLOSE, 0][..])));
        // Split mid-frame, as TCP may deliver it.
        let (first, rest) = wire.split_at(5);
        to_agent.write_all(first).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        to_agent.write_all(rest).await.unwrap();
        let output = cat.wait_with_output().await.expect("cat ends when stdin is closed");
        assert_eq!(output.stdout, b"hello world");
        assert_eq!(sent.recv().await, Some(WsFrame::message(Opcode::Pong, &b"beat"[..])));
        to_agent.write_all(&client(WsFrame::close(close_code::NORMAL, ""))).await.unwrap();
        reading.await.expect("the reader ends at the client's close");
    }
}
