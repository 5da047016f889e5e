//! Container logs: one directory per container inside the pod's log directory, one file per
//! incarnation (`0.log`, `1.log`, … as the container restarts), each rotated by size into
//! `N.log.1` … `N.log.<max_files - 1>` (newest first).
//!
//! A container's stdout and stderr are pipes read by a log shim, a small process of its own
//! (`strait log-shim`, [`run_shim`]) that writes each line in the CRI logging format
//! (`<RFC 3339 time> <stdout|stderr> <F|P> <content>`, as kubelet's log files are) and
//! rotates the file. The shim outlives an agent restart as the container does, and holds an
//! exclusive `flock` on the live file while it writes it, which tells a follower when the
//! incarnation's output has ended. [`stream_log`] reads it back the way `kubectl logs` asks.

use std::{
    collections::VecDeque,
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Write},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;

/// A line longer than this is written as several partial (`P`) entries, as CRI runtimes do.
const MAX_ENTRY_BYTES: u64 = 16 * 1024;
/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// How large a log file grows before it is rotated, and how many files (the live one
/// included) an incarnation keeps. kubelet's defaults: 10 MiB and 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    pub max_size: u64,
    pub max_files: u32,
}

impl Default for LogRotation {
    fn default() -> Self {
        Self { max_size: 10 * 1024 * 1024, max_files: 5 }
    }
}

/// Which of a container's output streams a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The directory of one container's logs inside its pod's log directory.
pub fn container_dir(pod_log_dir: &Path, container: &str) -> PathBuf {
    pod_log_dir.join(container)
}

/// The live log file of incarnation `restart` (the container's restart count when it started).
pub fn incarnation_path(container_dir: &Path, restart: u32) -> PathBuf {
    container_dir.join(format!("{restart}.log"))
}

fn rotated_path(live: &Path, index: u32) -> PathBuf {
    let mut name = live.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// Writes one incarnation's log entries, rotating by size. Holds an exclusive `flock` on the
/// live file for as long as it writes there.
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    rotation: LogRotation,
    file: File,
    size: u64,
}

impl LogWriter {
    /// Opens (or continues) the live file at `path`.
    pub fn open(path: &Path, rotation: LogRotation) -> io::Result<Self> {
        let file = open_locked(path, path)?;
        let size = file.metadata()?.len();
        Ok(Self { path: path.to_owned(), rotation, file, size })
    }

    /// Appends one entry; `partial` marks a piece of a line that continues in the next entry.
    pub fn write_entry(
        &mut self,
        time: Timestamp,
        stream: Stream,
        partial: bool,
        content: &[u8],
    ) -> io::Result<()> {
        let mut entry =
            format!("{time} {} {} ", stream.name(), if partial { 'P' } else { 'F' }).into_bytes();
        entry.extend_from_slice(content);
        entry.push(b'\n');
        let len = entry.len() as u64;
        if self.size > 0 && self.size + len > self.rotation.max_size {
            self.rotate()?;
        }
        // One write per entry, so that a reader never sees half of one at the end of the file
        // but for the instant of the write itself (readers stop at the last newline).
        self.file.write_all(&entry)?;
        self.size += len;
        Ok(())
    }

    /// Shifts `N.log.i` to `N.log.i+1` (dropping the oldest), the live file to `N.log.1`,
    /// and starts a new live file. The new file is created and locked under a temporary
    /// name and then renamed into place, so the live path always names a locked file (or,
    /// for an instant, nothing).
    fn rotate(&mut self) -> io::Result<()> {
        let kept = self.rotation.max_files.max(1) - 1;
        if kept == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for index in (1..kept).rev() {
            match std::fs::rename(
                rotated_path(&self.path, index),
                rotated_path(&self.path, index + 1),
            ) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                _ => {}
            }
        }
        let staged = {
            let mut name = self.path.as_os_str().to_owned();
            name.push(".new");
            PathBuf::from(name)
        };
        let fresh = open_locked(&staged, &self.path)?;
        fresh.set_len(0)?;
        std::fs::rename(&self.path, rotated_path(&self.path, 1))?;
        std::fs::rename(&staged, &self.path)?;
        // The old file's lock goes with its descriptor.
        self.file = fresh;
        self.size = 0;
        Ok(())
    }
}

fn open_locked(path: &Path, shown: &Path) -> io::Result<File> {
    let file =
        OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
            io::Error::new(e.kind(), format!("opening log {}: {e}", shown.display()))
        })?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("locking log {}: another writer holds it ({error})", shown.display()),
        ));
    }
    Ok(file)
}

/// Whether a log shim still writes `file` (holds its exclusive lock).
fn is_being_written(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: flock on a descriptor borrowed for the call; a shared lock taken is released
    // at once.
    unsafe {
        if libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) == 0 {
            libc::flock(fd, libc::LOCK_UN);
            false
        } else {
            true
        }
    }
}

/// The log shim's work: reads the container's stdout and stderr until both are closed (the
/// container and everything it started have let them go), writing each line to the log at
/// `path`. A write that fails is reported once and the pipes are still drained, so that a
/// full disk never blocks the container.
pub fn run_shim(path: &Path, rotation: LogRotation, stdout: File, stderr: File) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(LogWriter::open(path, rotation)?));
    let for_stderr = Arc::clone(&writer);
    let stderr_copier = std::thread::Builder::new()
        .name("stderr".into())
        .spawn(move || copy_lines(stderr, Stream::Stderr, &for_stderr))?;
    copy_lines(stdout, Stream::Stdout, &writer);
    stderr_copier.join().map_err(|_| io::Error::other("the stderr copier panicked"))?;
    Ok(())
}

fn copy_lines(pipe: File, stream: Stream, writer: &Mutex<LogWriter>) {
    let mut reader = BufReader::with_capacity(MAX_ENTRY_BYTES as usize, pipe);
    let mut line = Vec::with_capacity(MAX_ENTRY_BYTES as usize);
    let mut failed = false;
    loop {
        line.clear();
        match (&mut reader).take(MAX_ENTRY_BYTES).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                eprintln!("log shim: reading {}: {error}", stream.name());
                return;
            }
        }
        // A line cut at the size limit continues in the next entry; a last line without a
        // newline (at EOF) is a whole one.
        let partial = line.last() != Some(&b'\n') && line.len() as u64 == MAX_ENTRY_BYTES;
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let written = match writer.lock() {
            Ok(mut writer) => writer.write_entry(Timestamp::now(), stream, partial, content),
            Err(_) => Err(io::Error::other("the other stream's copier panicked")),
        };
        // Reported once per run of failures, not per line.
        match written {
            Err(error) if !failed => {
                eprintln!(
                    "log shim: writing {}: {error} (output is dropped until it works)",
                    stream.name()
                );
                failed = true;
            }
            Err(_) => {}
            Ok(()) => failed = false,
        }
    }
}

/// One entry of a CRI log file.
#[derive(Debug, PartialEq, Eq)]
struct Entry<'a> {
    time: &'a str,
    partial: bool,
    content: &'a [u8],
}

fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let mut fields = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(fields.next()?).ok()?;
    let _stream = fields.next()?;
    let partial = match fields.next()? {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(Entry { time, partial, content: fields.next().unwrap_or_default() })
}

/// What `kubectl logs` asks for (the `pods/log` query, minus the container).
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    pub previous: bool,
    pub follow: bool,
    pub tail_lines: Option<u64>,
    pub timestamps: bool,
    pub limit_bytes: Option<u64>,
    /// Only lines written at or after this instant.
    pub since: Option<Timestamp>,
}

/// Why a container's log cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("the container has no log on this node")]
    NoLog,
    #[error("the container has no previous incarnation")]
    NoPrevious,
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The incarnations a container's directory holds, oldest first.
pub fn incarnations(container_dir: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(container_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

/// Where a reader's output goes. Returns false once nobody listens any more.
pub trait LogSink {
    fn send(&mut self, chunk: Vec<u8>) -> bool;
    fn is_closed(&self) -> bool;
}

/// Everything, at once (for tools and tests reading a finished or current log).
impl LogSink for Vec<u8> {
    fn send(&mut self, chunk: Vec<u8>) -> bool {
        self.extend(chunk);
        true
    }
    fn is_closed(&self) -> bool {
        false
    }
}

impl LogSink for tokio::sync::mpsc::Sender<Vec<u8>> {
    fn send(&mut self, chunk: Vec<u8>) -> bool {
        self.blocking_send(chunk).is_ok()
    }
    fn is_closed(&self) -> bool {
        tokio::sync::mpsc::Sender::is_closed(self)
    }
}

/// Shapes entries into what the client sees: the timestamp option, `since`, the byte limit.
struct Output<'s, S: LogSink> {
    sink: &'s mut S,
    options: LogOptions,
    sent: u64,
    /// Whether the next entry starts a line (and so carries the timestamp).
    at_line_start: bool,
    buffer: Vec<u8>,
}

impl<S: LogSink> Output<'_, S> {
    /// Adds one entry; false when the byte limit is reached.
    fn entry(&mut self, entry: &Entry<'_>) -> bool {
        if let Some(since) = self.options.since
            && entry.time.parse::<Timestamp>().is_ok_and(|time| time < since)
        {
            self.at_line_start = !entry.partial;
            return true;
        }
        let mut piece = Vec::with_capacity(entry.content.len() + 40);
        if self.options.timestamps && self.at_line_start {
            piece.extend_from_slice(entry.time.as_bytes());
            piece.push(b' ');
        }
        piece.extend_from_slice(entry.content);
        if !entry.partial {
            piece.push(b'\n');
        }
        self.at_line_start = !entry.partial;
        if let Some(limit) = self.options.limit_bytes {
            let room = limit.saturating_sub(self.sent + self.buffer.len() as u64);
            if (piece.len() as u64) >= room {
                piece.truncate(room as usize);
                self.buffer.extend_from_slice(&piece);
                return false;
            }
        }
        self.buffer.extend_from_slice(&piece);
        true
    }

    fn flush(&mut self) -> bool {
        if self.buffer.is_empty() {
            return !self.sink.is_closed();
        }
        self.sent += self.buffer.len() as u64;
        self.sink.send(std::mem::take(&mut self.buffer))
    }
}

/// Streams one container's log to `sink` as `options` ask: the latest incarnation (or the
/// one before it for `previous`), its rotated files first. With `follow`, keeps sending what
/// the shim appends until the incarnation ends (its shim lets the file go, or the container
/// restarted) or the sink closes. Blocking: run it on a thread of its own.
pub fn stream_log(
    container_dir: &Path,
    options: &LogOptions,
    sink: &mut impl LogSink,
) -> Result<(), LogError> {
    let found = incarnations(container_dir);
    let incarnation = if options.previous {
        *found.iter().rev().nth(1).ok_or(LogError::NoPrevious)?
    } else {
        *found.last().ok_or(LogError::NoLog)?
    };
    stream_incarnation(container_dir, incarnation, options, sink)
}

/// [`stream_log`] of a given incarnation (`previous` aside: it has been chosen).
pub fn stream_incarnation(
    container_dir: &Path,
    incarnation: u32,
    options: &LogOptions,
    sink: &mut impl LogSink,
) -> Result<(), LogError> {
    let live_path = incarnation_path(container_dir, incarnation);
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| LogError::Io { path, source }
    };

    // Everything written so far, oldest first; of the live file only complete lines.
    let mut lines: VecDeque<Vec<u8>> = VecDeque::new();
    let tail = options.tail_lines;
    // Trimmed now and then rather than per line, so a tail costs O(lines) overall.
    let keep = |line: Vec<u8>, lines: &mut VecDeque<Vec<u8>>| {
        lines.push_back(line);
        if let Some(tail) = tail
            && lines.len() as u64 > tail.saturating_mul(2).saturating_add(64)
        {
            trim_to_tail(lines, tail);
        }
    };
    for index in (1..64).rev() {
        let rotated = rotated_path(&live_path, index);
        match File::open(&rotated) {
            Ok(file) => {
                for line in BufReader::new(file).split(b'\n') {
                    keep(line.map_err(io_error(&rotated))?, &mut lines);
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(&rotated)(error)),
        }
    }
    let mut live = match File::open(&live_path) {
        Ok(file) => Some(file),
        // Rotating at this instant: its newest content is in `.1`, already read.
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => return Err(io_error(&live_path)(error)),
    };
    let mut pending = Vec::new();
    if let Some(file) = live.as_mut() {
        file.read_to_end(&mut pending).map_err(io_error(&live_path))?;
        for line in take_complete_lines(&mut pending) {
            keep(line, &mut lines);
        }
    }

    if let Some(tail) = tail {
        trim_to_tail(&mut lines, tail);
    }
    let mut output =
        Output { sink, options: options.clone(), sent: 0, at_line_start: true, buffer: Vec::new() };
    for line in &lines {
        if let Some(entry) = parse_entry(line)
            && !output.entry(&entry)
        {
            output.flush();
            return Ok(());
        }
    }
    drop(lines);
    if !output.flush() || !options.follow || options.previous {
        return Ok(());
    }

    // Following: new complete lines of the live file, across rotations, until the
    // incarnation ends.
    let mut ended_checks = 0;
    loop {
        let mut appended = false;
        if let Some(file) = live.as_mut() {
            let before = pending.len();
            file.read_to_end(&mut pending).map_err(io_error(&live_path))?;
            appended = pending.len() > before;
        }
        for line in take_complete_lines(&mut pending) {
            if let Some(entry) = parse_entry(&line)
                && !output.entry(&entry)
            {
                output.flush();
                return Ok(());
            }
        }
        if !output.flush() {
            return Ok(());
        }
        if appended {
            continue;
        }
        // Rotated: the old file was read to its end above, go on with the new one.
        let current = File::open(&live_path).ok();
        let replaced = match (&live, &current) {
            (Some(old), Some(new)) => !same_file(old, new),
            (None, Some(_)) => true,
            _ => false,
        };
        if replaced {
            live = current;
            pending.clear();
            continue;
        }
        let writing = current.as_ref().is_some_and(is_being_written);
        let restarted = incarnations(container_dir).last().is_some_and(|n| *n > incarnation);
        if (restarted || !writing) && live.is_some() {
            // One more look after the writer let go, for what it wrote last.
            ended_checks += 1;
            if ended_checks > 1 {
                return Ok(());
            }
        } else {
            ended_checks = 0;
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// Drops lines from the front until the last `tail` whole lines are left (an entry that
/// continues a line counts with the line it ends).
fn trim_to_tail(lines: &mut VecDeque<Vec<u8>>, tail: u64) {
    let mut whole = 0u64;
    let mut cut = 0;
    for (index, line) in lines.iter().enumerate().rev() {
        if parse_entry(line).is_some_and(|entry| !entry.partial) {
            whole += 1;
            if whole > tail {
                cut = index + 1;
                break;
            }
        }
    }
    lines.drain(..cut);
}

/// The complete lines at the front of `buffer` (without their newline), leaving a trailing
/// incomplete one in it.
fn take_complete_lines(buffer: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let Some(last_newline) = buffer.iter().rposition(|b| *b == b'\n') else {
        return Vec::new();
    };
    let rest = buffer.split_off(last_newline + 1);
    let complete = std::mem::replace(buffer, rest);
    complete[..last_newline].split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).expect("metadata").len()
    }

    fn read(dir: &Path, options: LogOptions) -> String {
        let mut collected = Vec::new();
        stream_log(dir, &options, &mut collected).expect("reading the log");
        String::from_utf8(collected).expect("utf-8")
    }

    fn write_lines(writer: &mut LogWriter, lines: std::ops::Range<u32>) {
        for n in lines {
            writer
                .write_entry(
                    Timestamp::now(),
                    Stream::Stdout,
                    false,
                    format!("line {n}").as_bytes(),
                )
                .expect("writing");
        }
    }

    #[test]
    fn a_full_file_rotates_and_the_oldest_files_are_dropped() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let rotation = LogRotation { max_size: 500, max_files: 3 };
        let mut writer = LogWriter::open(&live, rotation).expect("open");
        write_lines(&mut writer, 0..100);
        assert!(file_len(&live) <= 500, "the live file stays under the limit");
        assert!(rotated_path(&live, 1).exists() && rotated_path(&live, 2).exists());
        assert!(!rotated_path(&live, 3).exists(), "max_files counts the live file");
        for index in 1..=2 {
            assert!(file_len(&rotated_path(&live, index)) <= 500);
        }
        // What is kept reads back in order and ends with the newest line.
        let text = read(dir.path(), LogOptions::default());
        let numbers: Vec<u32> = text
            .lines()
            .map(|l| l.strip_prefix("line ").expect("content").parse().expect("number"))
            .collect();
        assert_eq!(numbers.last(), Some(&99));
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "no gap or reordering: {numbers:?}");
        assert!(numbers[0] > 0, "the oldest lines were dropped");
    }

    #[test]
    fn a_second_writer_of_the_same_file_is_refused() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let _first = LogWriter::open(&live, LogRotation::default()).expect("open");
        assert!(LogWriter::open(&live, LogRotation::default()).is_err());
    }

    #[test]
    fn tail_counts_whole_lines_across_rotated_files() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let mut writer =
            LogWriter::open(&live, LogRotation { max_size: 200, max_files: 5 }).expect("open");
        write_lines(&mut writer, 0..10);
        writer.write_entry(Timestamp::now(), Stream::Stderr, true, b"split ").expect("write");
        writer.write_entry(Timestamp::now(), Stream::Stderr, false, b"line").expect("write");
        assert!(rotated_path(&live, 1).exists(), "the lines span files");
        let text = read(dir.path(), LogOptions { tail_lines: Some(3), ..Default::default() });
        assert_eq!(text, "line 8\nline 9\nsplit line\n");
        let none = read(dir.path(), LogOptions { tail_lines: Some(0), ..Default::default() });
        assert_eq!(none, "");
    }

    #[test]
    fn previous_reads_the_incarnation_before_the_latest() {
        let dir = tempdir();
        let mut first = LogWriter::open(&incarnation_path(dir.path(), 0), LogRotation::default())
            .expect("open");
        write_lines(&mut first, 0..2);
        drop(first);
        assert!(matches!(
            stream_log(
                dir.path(),
                &LogOptions { previous: true, ..Default::default() },
                &mut Vec::new()
            ),
            Err(LogError::NoPrevious)
        ));
        let mut second = LogWriter::open(&incarnation_path(dir.path(), 1), LogRotation::default())
            .expect("open");
        write_lines(&mut second, 5..6);
        assert_eq!(read(dir.path(), LogOptions::default()), "line 5\n");
        assert_eq!(
            read(dir.path(), LogOptions { previous: true, ..Default::default() }),
            "line 0\nline 1\n"
        );
    }

    #[test]
    fn timestamps_since_and_limit_bytes_shape_the_output() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let mut writer = LogWriter::open(&live, LogRotation::default()).expect("open");
        let early: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let late: Timestamp = "2026-01-01T00:01:00.5Z".parse().expect("time");
        writer.write_entry(early, Stream::Stdout, false, b"early").expect("write");
        writer.write_entry(late, Stream::Stdout, false, b"late").expect("write");
        let stamped = read(dir.path(), LogOptions { timestamps: true, ..Default::default() });
        assert_eq!(stamped, "2026-01-01T00:00:00Z early\n2026-01-01T00:01:00.5Z late\n");
        let since = read(
            dir.path(),
            LogOptions { since: "2026-01-01T00:00:30Z".parse().ok(), ..Default::default() },
        );
        assert_eq!(since, "late\n");
        let limited = read(dir.path(), LogOptions { limit_bytes: Some(8), ..Default::default() });
        assert_eq!(limited, "early\nla");
    }

    #[test]
    fn a_follower_gets_new_lines_and_ends_when_the_writer_lets_go() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let mut writer =
            LogWriter::open(&live, LogRotation { max_size: 300, max_files: 2 }).expect("open");
        write_lines(&mut writer, 0..1);
        let (sender, mut receiver) = tokio::sync::mpsc::channel(64);
        let follow_dir = dir.path().to_owned();
        let follower = std::thread::spawn(move || {
            let mut sink = sender;
            stream_log(&follow_dir, &LogOptions { follow: true, ..Default::default() }, &mut sink)
        });
        assert_eq!(receiver.blocking_recv().as_deref(), Some(&b"line 0\n"[..]));
        // Enough to rotate once while followed (a follower that lags a whole file behind
        // misses it, as kubelet's do).
        write_lines(&mut writer, 1..9);
        assert!(rotated_path(&live, 1).exists());
        drop(writer);
        let mut rest = Vec::new();
        while let Some(chunk) = receiver.blocking_recv() {
            rest.extend(chunk);
        }
        let expected: String = (1..9).map(|n| format!("line {n}\n")).collect();
        assert_eq!(String::from_utf8(rest).expect("utf-8"), expected);
        follower.join().expect("follower").expect("follow");
    }

    #[test]
    fn the_shim_writes_both_streams_until_they_close() {
        let dir = tempdir();
        let live = incarnation_path(dir.path(), 0);
        let (out_read, out_write) = std::io::pipe().expect("pipe");
        let (err_read, err_write) = std::io::pipe().expect("pipe");
        let shim_path = live.clone();
        let shim = std::thread::spawn(move || {
            run_shim(
                &shim_path,
                LogRotation::default(),
                File::from(std::os::fd::OwnedFd::from(out_read)),
                File::from(std::os::fd::OwnedFd::from(err_read)),
            )
        });
        let mut out_write = out_write;
        let mut err_write = err_write;
        out_write.write_all(b"to stdout\nno newline").expect("write");
        err_write.write_all(b"to stderr\n").expect("write");
        drop(out_write);
        drop(err_write);
        shim.join().expect("shim").expect("shim ran");
        let file = std::fs::read_to_string(&live).expect("log");
        let mut streams: Vec<&str> =
            file.lines().map(|l| l.split(' ').nth(1).expect("stream")).collect();
        streams.sort_unstable();
        assert_eq!(streams, ["stderr", "stdout", "stdout"]);
        let mut text: Vec<String> =
            read(dir.path(), LogOptions::default()).lines().map(str::to_owned).collect();
        text.sort();
        assert_eq!(text, ["no newline", "to stderr", "to stdout"]);
    }

    /// A directory removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "strait-logs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}
