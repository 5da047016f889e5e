//! The server side of a SPDY/3.1 connection, as remote commands use it: the client opens
//! every stream (SYN_STREAM, odd ids), the server accepts each with a SYN_REPLY, data flows
//! both ways, and a FIN half-closes a stream.
//!
//! Two tasks own the connection: a reader that decodes frames and routes data to streams,
//! and a writer that encodes what the session sends. The writer alone compresses header
//! blocks, so the compression stream follows the order of the frames on the wire.
//!
//! Flow control (SPDY/3.1, section 2.6.8 and the session window): received data is
//! acknowledged with WINDOW_UPDATE frames on the stream and the session as it is handed on.
//! Sending does not wait for the peer's window: the SPDY peer of every Kubernetes client
//! (moby/spdystream) neither grants window nor enforces it, and waiting for grants that never
//! come would stall every output after 64 KiB.

pub mod frame;
pub mod header_block;

use std::{collections::HashMap, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    task::JoinHandle,
};

use frame::{Frame, FrameError, goaway_status, rst_status};
use header_block::{HeaderCompressor, HeaderDecompressor, HeaderList};

/// Largest data frame this side sends.
pub const MAX_DATA_FRAME: usize = 32 * 1024;
/// Data frames of one stream that may wait for its consumer before the reader stops reading
/// (and so pushes back on the peer through TCP).
const STREAM_QUEUE: usize = 64;

/// A stream the client opened.
#[derive(Debug)]
pub struct IncomingStream {
    pub id: u32,
    pub headers: HeaderList,
    /// What the client sends on it; closed by its FIN (or a reset, or the connection's end).
    pub data: mpsc::Receiver<Bytes>,
}

/// What the session asks the writer to put on the wire.
#[derive(Debug)]
enum Outgoing {
    Reply { stream_id: u32 },
    Data { stream_id: u32, data: Bytes, fin: bool },
    WindowUpdate { stream_id: u32, delta: u32 },
    Ping { id: u32 },
    Reset { stream_id: u32, status: u32 },
    GoAway { last_good_stream_id: u32, status: u32 },
}

/// Sends on the streams of a connection. Cheap to clone; the connection's writer ends when
/// every clone is gone and the reader has stopped.
#[derive(Clone, Debug)]
pub struct SpdySender {
    out: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct ConnectionClosed;

impl SpdySender {
    /// Sends `data` on a stream, cut into frames of at most [`MAX_DATA_FRAME`] bytes.
    pub fn send(&self, stream_id: u32, mut data: Bytes) -> Result<(), ConnectionClosed> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_FRAME));
            self.out
                .send(Outgoing::Data { stream_id, data: chunk, fin: false })
                .map_err(|_| ConnectionClosed)?;
        }
        Ok(())
    }

    /// Half-closes a stream from this side (an empty data frame with FIN).
    pub fn finish(&self, stream_id: u32) -> Result<(), ConnectionClosed> {
        self.out
            .send(Outgoing::Data { stream_id, data: Bytes::new(), fin: true })
            .map_err(|_| ConnectionClosed)
    }

    /// Tells the peer no further streams are accepted.
    pub fn go_away(&self, last_good_stream_id: u32) -> Result<(), ConnectionClosed> {
        self.out
            .send(Outgoing::GoAway { last_good_stream_id, status: goaway_status::OK })
            .map_err(|_| ConnectionClosed)
    }
}

/// A running server connection: its streams as the client opens them, a sender, and the
/// tasks, which end when the peer closes the connection (reader) and when every sender is
/// gone (writer, which then shuts the connection's write side down).
pub struct SpdyConnection {
    pub streams: mpsc::UnboundedReceiver<IncomingStream>,
    pub sender: SpdySender,
    reader: JoinHandle<Result<(), SpdyError>>,
    writer: JoinHandle<Result<(), SpdyError>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("reading from the connection")]
    Read(#[source] std::io::Error),
    #[error("writing to the connection")]
    Write(#[source] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream {stream_id}: {source}")]
    Headers {
        stream_id: u32,
        #[source]
        source: header_block::HeaderBlockError,
    },
}

impl SpdyConnection {
    /// Starts serving `io` (an upgraded HTTP connection).
    pub fn serve<IO>(io: IO) -> Self
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (out, outgoing) = mpsc::unbounded_channel();
        let (streams_tx, streams) = mpsc::unbounded_channel();
        let sender = SpdySender { out };
        let reader = tokio::spawn(read_frames(read, sender.clone(), streams_tx));
        let writer = tokio::spawn(write_frames(write, outgoing));
        Self { streams, sender, reader, writer }
    }

    /// Waits (up to `timeout`) for the client to close the connection after this side is done,
    /// so that nothing it still has to read is cut off, then for the writer to flush.
    pub async fn close(self, timeout: Duration) {
        let Self { streams, sender, reader, writer } = self;
        drop(streams);
        drop(sender);
        let mut reader = reader;
        match tokio::time::timeout(timeout, &mut reader).await {
            Ok(Ok(Ok(()))) | Err(_) => {}
            Ok(Ok(Err(error))) => tracing::debug!(%error, "SPDY connection ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "the SPDY reader failed"),
        }
        reader.abort();
        match tokio::time::timeout(timeout, writer).await {
            Ok(Ok(Err(error))) => tracing::debug!(%error, "SPDY writer ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "the SPDY writer failed"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }
}

struct StreamState {
    data: Option<mpsc::Sender<Bytes>>,
}

async fn read_frames<R: AsyncRead + Unpin>(
    mut read: R,
    sender: SpdySender,
    new_streams: mpsc::UnboundedSender<IncomingStream>,
) -> Result<(), SpdyError> {
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    let mut headers = HeaderDecompressor::new();
    let mut streams: HashMap<u32, StreamState> = HashMap::new();
    let mut last_stream_id = 0;
    let mut going_away = false;
    loop {
        let frame = loop {
            if let Some(frame) = Frame::decode(&mut buffer)? {
                break frame;
            }
            buffer.reserve(16 * 1024);
            if read.read_buf(&mut buffer).await.map_err(SpdyError::Read)? == 0 {
                // The peer closed the connection: every stream ends (its receivers close).
                return Ok(());
            }
        };
        match frame {
            Frame::SynStream { stream_id, flags, header_block, .. } => {
                // Decoded whatever becomes of the stream: the compression state must advance.
                let decoded = headers
                    .decompress(&header_block)
                    .map_err(|source| SpdyError::Headers { stream_id, source })?;
                // Client streams have odd, increasing ids (section 2.3.2).
                if stream_id % 2 == 0 || stream_id <= last_stream_id {
                    let _ = sender
                        .out
                        .send(Outgoing::Reset { stream_id, status: rst_status::PROTOCOL_ERROR });
                    continue;
                }
                if going_away {
                    let _ = sender
                        .out
                        .send(Outgoing::Reset { stream_id, status: rst_status::REFUSED_STREAM });
                    continue;
                }
                last_stream_id = stream_id;
                let (data_tx, data) = mpsc::channel(STREAM_QUEUE);
                let client_done = flags & frame::FLAG_FIN != 0;
                streams.insert(stream_id, StreamState { data: (!client_done).then_some(data_tx) });
                let _ = sender.out.send(Outgoing::Reply { stream_id });
                if new_streams
                    .send(IncomingStream { id: stream_id, headers: decoded, data })
                    .is_err()
                {
                    going_away = true;
                }
            }
            Frame::Data { stream_id, fin, data } => {
                let Some(stream) = streams.get_mut(&stream_id) else {
                    let _ = sender
                        .out
                        .send(Outgoing::Reset { stream_id, status: rst_status::INVALID_STREAM });
                    continue;
                };
                let length = data.len() as u32;
                if let Some(consumer) = &stream.data
                    && !data.is_empty()
                    && consumer.send(data).await.is_err()
                {
                    // Nobody reads this stream any more: drop what comes.
                    stream.data = None;
                }
                if length > 0 {
                    let _ = sender.out.send(Outgoing::WindowUpdate { stream_id, delta: length });
                    let _ = sender.out.send(Outgoing::WindowUpdate { stream_id: 0, delta: length });
                }
                if fin {
                    stream.data = None;
                }
            }
            Frame::RstStream { stream_id, .. } => {
                streams.remove(&stream_id);
            }
            Frame::Headers { stream_id, header_block, fin } => {
                headers
                    .decompress(&header_block)
                    .map_err(|source| SpdyError::Headers { stream_id, source })?;
                if fin && let Some(stream) = streams.get_mut(&stream_id) {
                    stream.data = None;
                }
            }
            // Pings the client started have odd ids; answer them (section 2.6.5).
            Frame::Ping { id } if id % 2 == 1 => {
                let _ = sender.out.send(Outgoing::Ping { id });
            }
            Frame::GoAway { .. } => going_away = true,
            // The client's SYN_REPLY (it opens no server streams), our pings' echoes, its
            // windows and settings: nothing to do.
            Frame::SynReply { .. }
            | Frame::Ping { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. }
            | Frame::Unknown { .. } => {}
        }
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut write: W,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
) -> Result<(), SpdyError> {
    let mut headers = HeaderCompressor::new();
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    while let Some(first) = outgoing.recv().await {
        let mut next = Some(first);
        // Everything already queued goes out in one write.
        while let Some(item) = next {
            let frame = match item {
                Outgoing::Reply { stream_id } => Frame::SynReply {
                    stream_id,
                    fin: false,
                    header_block: headers
                        .compress(&[])
                        .map_err(|source| SpdyError::Headers { stream_id, source })?,
                },
                Outgoing::Data { stream_id, data, fin } => Frame::Data { stream_id, fin, data },
                Outgoing::WindowUpdate { stream_id, delta } => {
                    Frame::WindowUpdate { stream_id, delta }
                }
                Outgoing::Ping { id } => Frame::Ping { id },
                Outgoing::Reset { stream_id, status } => Frame::RstStream { stream_id, status },
                Outgoing::GoAway { last_good_stream_id, status } => {
                    Frame::GoAway { last_good_stream_id, status }
                }
            };
            frame.encode(&mut buffer);
            next = if buffer.len() < 64 * 1024 { outgoing.try_recv().ok() } else { None };
        }
        write.write_all(&buffer).await.map_err(SpdyError::Write)?;
        buffer.clear();
        write.flush().await.map_err(SpdyError::Write)?;
    }
    write.shutdown().await.map_err(SpdyError::Write)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::{Bytes, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{
        SpdyConnection,
        frame::{FLAG_FIN, Frame},
        header_block::{HeaderCompressor, HeaderDecompressor, header},
    };

    /// Reads frames from the client end until `count` were seen.
    async fn read_frames(
        client: &mut tokio::io::DuplexStream,
        buffer: &mut BytesMut,
        count: usize,
    ) -> Vec<Frame> {
        let mut frames = Vec::new();
        while frames.len() < count {
            if let Some(frame) = Frame::decode(buffer).expect("valid frames") {
                frames.push(frame);
                continue;
            }
            let read = tokio::time::timeout(Duration::from_secs(5), client.read_buf(buffer))
                .await
                .expect("the server answers")
                .expect("read");
            assert!(read > 0, "the server closed early; got {frames:?}");
        }
        frames
    }

    #[tokio::test]
    async fn client_streams_are_accepted_their_data_delivered_and_answers_sent() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut connection = SpdyConnection::serve(server);
        let mut compressor = HeaderCompressor::new();
        let mut wire = BytesMut::new();
        for (id, kind) in [(1, "error"), (3, "stdin")] {
            Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                header_block: compressor.compress(&[("streamtype", kind)]).unwrap(),
            }
            .encode(&mut wire);
        }
        Frame::Data { stream_id: 3, fin: true, data: Bytes::from_static(b"typed") }
            .encode(&mut wire);
        Frame::Ping { id: 1 }.encode(&mut wire);
        client.write_all(&wire).await.unwrap();

        let error = connection.streams.recv().await.expect("first stream");
        assert_eq!((error.id, header(&error.headers, "streamType")), (1, Some("error")));
        let mut stdin = connection.streams.recv().await.expect("second stream");
        assert_eq!(header(&stdin.headers, "streamtype"), Some("stdin"));
        assert_eq!(stdin.data.recv().await.as_deref(), Some(&b"typed"[..]));
        assert_eq!(stdin.data.recv().await, None, "FIN ends the stream's data");

        connection.sender.send(1, Bytes::from_static(b"status")).unwrap();
        connection.sender.finish(1).unwrap();

        let mut buffer = BytesMut::new();
        // Two replies, two window updates, the ping's echo, the data and its FIN.
        let frames = read_frames(&mut client, &mut buffer, 7).await;
        let mut decompressor = HeaderDecompressor::new();
        let replies: Vec<u32> = frames
            .iter()
            .filter_map(|frame| match frame {
                Frame::SynReply { stream_id, header_block, .. } => {
                    assert!(decompressor.decompress(header_block).unwrap().is_empty());
                    Some(*stream_id)
                }
                _ => None,
            })
            .collect();
        assert_eq!(replies, [1, 3]);
        assert!(frames.contains(&Frame::Ping { id: 1 }), "{frames:?}");
        assert!(frames.contains(&Frame::WindowUpdate { stream_id: 3, delta: 5 }));
        assert!(frames.contains(&Frame::WindowUpdate { stream_id: 0, delta: 5 }));
        assert!(frames.contains(&Frame::Data {
            stream_id: 1,
            fin: false,
            data: Bytes::from_static(b"status")
        }));
        assert!(frames.contains(&Frame::Data { stream_id: 1, fin: true, data: Bytes::new() }));

        drop(client);
        connection.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn even_or_reused_stream_ids_are_reset() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut connection = SpdyConnection::serve(server);
        let mut compressor = HeaderCompressor::new();
        let mut wire = BytesMut::new();
        for id in [2, 5, 5] {
            Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: FLAG_FIN,
                header_block: compressor.compress(&[("streamtype", "stdout")]).unwrap(),
            }
            .encode(&mut wire);
        }
        client.write_all(&wire).await.unwrap();
        let accepted = connection.streams.recv().await.expect("stream 5");
        assert_eq!(accepted.id, 5);
        let mut buffer = BytesMut::new();
        let frames = read_frames(&mut client, &mut buffer, 3).await;
        let resets = frames.iter().filter(|f| matches!(f, Frame::RstStream { .. })).count();
        assert_eq!(resets, 2, "{frames:?}");
        assert!(connection.streams.try_recv().is_err(), "only one stream was accepted");
    }

    #[tokio::test]
    async fn long_output_is_cut_into_frames_and_shutdown_follows_the_last_sender() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let connection = SpdyConnection::serve(server);
        connection.sender.send(1, Bytes::from(vec![7u8; 100_000])).unwrap();
        drop(client.write_all(&[]).await);
        let closing = tokio::spawn(async move {
            connection.close(Duration::from_millis(200)).await;
        });
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        closing.await.unwrap();
        let mut buffer = BytesMut::from(&received[..]);
        let mut total = 0;
        let mut frames = 0;
        while let Some(Frame::Data { data, .. }) = Frame::decode(&mut buffer).unwrap() {
            assert!(data.len() <= super::MAX_DATA_FRAME);
            total += data.len();
            frames += 1;
        }
        assert_eq!((total, frames), (100_000, 4));
    }
}
