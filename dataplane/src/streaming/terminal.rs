//! The pseudo-terminal of `kubectl exec -t`: the command gets the terminal's side as its
//! stdin, stdout, stderr and controlling terminal; the agent reads and writes the other side
//! without holding a thread, and gives it the client's window sizes.
//!
//! Both descriptors are opened close-on-exec, so no other process the agent starts (another
//! container, another exec) inherits them: a stray copy of the command's side would keep the
//! terminal open after the command ends, and the session would never see its end.

use std::{
    io,
    os::fd::{AsRawFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use nix::{fcntl::OFlag, pty};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, unix::AsyncFd};

/// A window size as kubectl sends it (client-go's `TerminalSize`), on the resize channel.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The agent's side of a pseudo-terminal.
#[derive(Debug)]
pub struct Terminal {
    master: AsyncFd<OwnedFd>,
}

impl Terminal {
    /// A new pseudo-terminal: the agent's side, and the command's (for one child's standard
    /// streams; drop it once the child is started, or the end is never seen).
    pub fn open() -> io::Result<(Arc<Self>, OwnedFd)> {
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
        let master = pty::posix_openpt(flags | OFlag::O_NONBLOCK)?;
        pty::grantpt(&master)?;
        pty::unlockpt(&master)?;
        let name = pty::ptsname_r(&master)?;
        let slave = nix::fcntl::open(name.as_str(), flags, nix::sys::stat::Mode::empty())?;
        // SAFETY: an `OwnedFd` is open for as long as it lives and always gives the same
        // descriptor, which is what registering with the reactor needs.
        let master = unsafe { AsyncFd::register(OwnedFd::from(master)) }?;
        Ok((Arc::new(Self { master }), slave))
    }

    /// Sets the window size; the kernel signals the terminal's foreground process group
    /// (SIGWINCH) when it changes.
    pub fn resize(&self, size: TerminalSize) -> io::Result<()> {
        let window =
            libc::winsize { ws_row: size.height, ws_col: size.width, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is a live local.
        let result = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &window) };
        if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// What the command writes to the terminal; it ends once every holder of the command's
    /// side has closed it.
    pub fn reader(self: &Arc<Self>) -> TerminalReader {
        TerminalReader(Arc::clone(self))
    }

    /// The command's input: what is written here is typed on the terminal.
    pub fn writer(self: &Arc<Self>) -> TerminalWriter {
        TerminalWriter(Arc::clone(self))
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.master.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(read)) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                // Linux answers EIO on the agent's side once the command's side is closed by
                // all: the end of the output.
                Ok(Err(error)) if error.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(error)) => return Poll::Ready(Err(error)),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.master.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => {}
            }
        }
    }
}

/// See [`Terminal::reader`].
#[derive(Debug)]
pub struct TerminalReader(Arc<Terminal>);

impl AsyncRead for TerminalReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

/// See [`Terminal::writer`].
#[derive(Debug)]
pub struct TerminalWriter(Arc<Terminal>);

impl AsyncWrite for TerminalWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The terminal stays open: it is closed with the last of its holders.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The window sizes in what a client sent on its resize stream: JSON objects, each on a line
/// of its own (SPDY, where a data frame may end mid-object: the rest stays in `pending`) or
/// one per message (WebSocket). A malformed line is skipped.
pub fn take_sizes(pending: &mut Vec<u8>, data: &[u8]) -> Vec<TerminalSize> {
    pending.extend_from_slice(data);
    let mut sizes = Vec::new();
    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        if let Ok(size) = serde_json::from_slice(&line) {
            sizes.push(size);
        }
    }
    sizes
}

/// One resize message of the WebSocket protocols (the JSON may or may not end with a newline).
pub fn parse_size(message: &[u8]) -> Option<TerminalSize> {
    serde_json::from_slice(message).ok()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn sizes_are_read_line_by_line_across_frames() {
        let mut pending = Vec::new();
        assert_eq!(take_sizes(&mut pending, br#"{"Width":80,"He"#), []);
        assert_eq!(
            take_sizes(&mut pending, b"ight\":24}\n{\"Width\":1\nnot json\n{\"Width\":120,"),
            [TerminalSize { width: 80, height: 24 }]
        );
        assert_eq!(
            take_sizes(&mut pending, b"\"Height\":50}\n"),
            [TerminalSize { width: 120, height: 50 }]
        );
        assert!(pending.is_empty());
        assert_eq!(
            parse_size(b"{\"Width\":3,\"Height\":4}\n"),
            Some(TerminalSize { width: 3, height: 4 })
        );
        assert_eq!(parse_size(b"{}"), None);
    }

    #[tokio::test]
    async fn a_command_on_the_terminal_sees_its_size_and_input_and_its_end_ends_the_output() {
        let (terminal, slave) = Terminal::open().expect("a pseudo-terminal");
        terminal.resize(TerminalSize { width: 101, height: 33 }).expect("resize");
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", "stty size; read line; echo got-$line"])
            .stdin(slave.try_clone().expect("dup"))
            .stdout(slave.try_clone().expect("dup"))
            .stderr(slave);
        let mut child = command.spawn().expect("sh");
        // The command's side is the child's alone now (`command` holds the last copies).
        drop(command);
        let mut writer = terminal.writer();
        writer.write_all(b"typed\n").await.expect("typing");
        let mut output = String::new();
        terminal.reader().read_to_string(&mut output).await.expect("the output, to its end");
        assert!(child.wait().await.expect("sh").success());
        // The terminal echoes what was typed, and ends lines with CR LF.
        assert!(output.contains("33 101\r\n"), "{output:?}");
        assert!(output.contains("got-typed\r\n"), "{output:?}");
    }
}
