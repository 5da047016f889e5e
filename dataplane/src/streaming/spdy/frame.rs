//! SPDY/3.1 frames on the wire (draft-mbelshe-httpbis-spdy, "Framing Layer", and the SPDY/3.1
//! changes to flow control): an 8-byte header, then the payload. Header blocks stay
//! compressed here; [`super::header_block`] turns them into name/value pairs, because their
//! compression state spans the whole connection and must follow the frames' order.
//!
//! ```text
//! control: |1| version (15) | type (16) |  flags (8) | length (24) | payload
//! data:    |0| stream id (31)           |  flags (8) | length (24) | payload
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The protocol version of every control frame (SPDY/3 and 3.1 share it).
pub const VERSION: u16 = 3;
/// The frame header's size.
pub const HEADER_LEN: usize = 8;
/// The largest payload this side accepts. The format allows 2^24 - 1 bytes; the peers of
/// remote commands send at most 32 KiB per frame, and a bound keeps a broken peer from making
/// the agent buffer 16 MiB per frame.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// `FLAG_FIN`: the sender's half of the stream ends with this frame (data, SYN_STREAM,
/// SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;
/// `FLAG_UNIDIRECTIONAL` of SYN_STREAM: the receiver's half is closed from the start.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// `FLAG_SETTINGS_CLEAR_SETTINGS` of SETTINGS.
pub const FLAG_CLEAR_SETTINGS: u8 = 0x01;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// Stream ids and window deltas are 31-bit; the top bit is reserved.
const ID_MASK: u32 = 0x7fff_ffff;

/// RST_STREAM status codes (section 2.6.3).
pub mod rst_status {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const STREAM_IN_USE: u32 = 8;
}

/// GOAWAY status codes (section 2.6.6).
pub mod goaway_status {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
}

/// One setting of a SETTINGS frame: `flags (8) | id (24) | value (32)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A frame, with header blocks still compressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        flags: u8,
        header_block: Bytes,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        header_block: Bytes,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        settings: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        header_block: Bytes,
    },
    /// Stream 0 is the session's window (SPDY/3.1).
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame of a type this side does not know (CREDENTIAL, say): receivers must
    /// ignore those (section 2.2.1).
    Unknown {
        frame_type: u16,
        flags: u8,
        payload: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("SPDY version {0} is not supported (only 3)")]
    UnsupportedVersion(u16),
    #[error("a frame of {0} bytes is larger than the {MAX_PAYLOAD} bytes accepted")]
    TooLarge(usize),
    #[error("a {kind} frame of {length} bytes is malformed")]
    Malformed { kind: &'static str, length: usize },
}

impl Frame {
    /// Parses one frame from the front of `buffer`, consuming it; `None` while the buffer
    /// holds less than a whole frame.
    pub fn decode(buffer: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buffer.len() < HEADER_LEN {
            return Ok(None);
        }
        let first = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]);
        let flags = buffer[4];
        let length =
            usize::from(buffer[5]) << 16 | usize::from(buffer[6]) << 8 | usize::from(buffer[7]);
        if length > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(length));
        }
        if buffer.len() < HEADER_LEN + length {
            return Ok(None);
        }
        buffer.advance(HEADER_LEN);
        let mut payload = buffer.split_to(length).freeze();
        if first & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream_id: first & ID_MASK,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let frame_type = (first & 0xffff) as u16;
        let malformed = |kind| FrameError::Malformed { kind, length };
        let frame = match frame_type {
            TYPE_SYN_STREAM => {
                if length < 10 {
                    return Err(malformed("SYN_STREAM"));
                }
                let stream_id = payload.get_u32() & ID_MASK;
                let associated_to = payload.get_u32() & ID_MASK;
                let priority = payload.get_u8() >> 5;
                let _slot = payload.get_u8();
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    header_block: payload,
                }
            }
            TYPE_SYN_REPLY => {
                if length < 4 {
                    return Err(malformed("SYN_REPLY"));
                }
                let stream_id = payload.get_u32() & ID_MASK;
                Frame::SynReply { stream_id, fin: flags & FLAG_FIN != 0, header_block: payload }
            }
            TYPE_RST_STREAM => {
                if length != 8 {
                    return Err(malformed("RST_STREAM"));
                }
                Frame::RstStream {
                    stream_id: payload.get_u32() & ID_MASK,
                    status: payload.get_u32(),
                }
            }
            TYPE_SETTINGS => {
                if length < 4 {
                    return Err(malformed("SETTINGS"));
                }
                let count = payload.get_u32() as usize;
                if payload.len() != count.saturating_mul(8) {
                    return Err(malformed("SETTINGS"));
                }
                let settings = (0..count)
                    .map(|_| {
                        let word = payload.get_u32();
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0x00ff_ffff,
                            value: payload.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings { clear: flags & FLAG_CLEAR_SETTINGS != 0, settings }
            }
            TYPE_PING => {
                if length != 4 {
                    return Err(malformed("PING"));
                }
                Frame::Ping { id: payload.get_u32() }
            }
            TYPE_GOAWAY => {
                // SPDY/3 added the status; tolerate the 4-byte SPDY/2 form's absence of it.
                if length != 8 && length != 4 {
                    return Err(malformed("GOAWAY"));
                }
                let last_good_stream_id = payload.get_u32() & ID_MASK;
                let status = if payload.has_remaining() { payload.get_u32() } else { 0 };
                Frame::GoAway { last_good_stream_id, status }
            }
            TYPE_HEADERS => {
                if length < 4 {
                    return Err(malformed("HEADERS"));
                }
                let stream_id = payload.get_u32() & ID_MASK;
                Frame::Headers { stream_id, fin: flags & FLAG_FIN != 0, header_block: payload }
            }
            TYPE_WINDOW_UPDATE => {
                if length != 8 {
                    return Err(malformed("WINDOW_UPDATE"));
                }
                Frame::WindowUpdate {
                    stream_id: payload.get_u32() & ID_MASK,
                    delta: payload.get_u32() & ID_MASK,
                }
            }
            other => Frame::Unknown { frame_type: other, flags, payload },
        };
        Ok(Some(frame))
    }

    /// Appends the frame's wire form to `out`. Payloads must fit in 24 bits; data frames are
    /// cut below that by their senders.
    pub fn encode(&self, out: &mut BytesMut) {
        let control = |out: &mut BytesMut, frame_type: u16, flags: u8, length: usize| {
            out.put_u32(0x8000_0000 | u32::from(VERSION) << 16 | u32::from(frame_type));
            put_flags_and_length(out, flags, length);
        };
        match self {
            Frame::Data { stream_id, fin, data } => {
                out.put_u32(stream_id & ID_MASK);
                put_flags_and_length(out, if *fin { FLAG_FIN } else { 0 }, data.len());
                out.put_slice(data);
            }
            Frame::SynStream { stream_id, associated_to, priority, flags, header_block } => {
                control(out, TYPE_SYN_STREAM, *flags, 10 + header_block.len());
                out.put_u32(stream_id & ID_MASK);
                out.put_u32(associated_to & ID_MASK);
                out.put_u8((priority & 0x07) << 5);
                out.put_u8(0);
                out.put_slice(header_block);
            }
            Frame::SynReply { stream_id, fin, header_block } => {
                control(
                    out,
                    TYPE_SYN_REPLY,
                    if *fin { FLAG_FIN } else { 0 },
                    4 + header_block.len(),
                );
                out.put_u32(stream_id & ID_MASK);
                out.put_slice(header_block);
            }
            Frame::RstStream { stream_id, status } => {
                control(out, TYPE_RST_STREAM, 0, 8);
                out.put_u32(stream_id & ID_MASK);
                out.put_u32(*status);
            }
            Frame::Settings { clear, settings } => {
                control(
                    out,
                    TYPE_SETTINGS,
                    if *clear { FLAG_CLEAR_SETTINGS } else { 0 },
                    4 + 8 * settings.len(),
                );
                out.put_u32(settings.len() as u32);
                for setting in settings {
                    out.put_u32(u32::from(setting.flags) << 24 | (setting.id & 0x00ff_ffff));
                    out.put_u32(setting.value);
                }
            }
            Frame::Ping { id } => {
                control(out, TYPE_PING, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway { last_good_stream_id, status } => {
                control(out, TYPE_GOAWAY, 0, 8);
                out.put_u32(last_good_stream_id & ID_MASK);
                out.put_u32(*status);
            }
            Frame::Headers { stream_id, fin, header_block } => {
                control(out, TYPE_HEADERS, if *fin { FLAG_FIN } else { 0 }, 4 + header_block.len());
                out.put_u32(stream_id & ID_MASK);
                out.put_slice(header_block);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control(out, TYPE_WINDOW_UPDATE, 0, 8);
                out.put_u32(stream_id & ID_MASK);
                out.put_u32(delta & ID_MASK);
            }
            Frame::Unknown { frame_type, flags, payload } => {
                control(out, *frame_type, *flags, payload.len());
                out.put_slice(payload);
            }
        }
    }
}

fn put_flags_and_length(out: &mut BytesMut, flags: u8, length: usize) {
    debug_assert!(length < 1 << 24, "a SPDY frame payload has 24 bits of length");
    out.put_u8(flags);
    out.put_u8((length >> 16) as u8);
    out.put_u16((length & 0xffff) as u16);
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::{FLAG_FIN, Frame, FrameError, Setting};

    fn round_trip(frame: Frame) {
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        let mut partial = BytesMut::from(&wire[..wire.len() - 1]);
        assert_eq!(Frame::decode(&mut partial), Ok(None), "one byte short is not a frame yet");
        let decoded = Frame::decode(&mut wire).expect("decodes").expect("a whole frame");
        assert_eq!(decoded, frame);
        assert!(wire.is_empty(), "the frame was consumed whole");
    }

    #[test]
    fn every_frame_type_survives_encoding_and_decoding() {
        round_trip(Frame::Data { stream_id: 5, fin: true, data: Bytes::from_static(b"hello") });
        round_trip(Frame::Data { stream_id: 0x7fff_ffff, fin: false, data: Bytes::new() });
        round_trip(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 7,
            flags: FLAG_FIN,
            header_block: Bytes::from_static(&[1, 2, 3]),
        });
        round_trip(Frame::SynReply {
            stream_id: 3,
            fin: false,
            header_block: Bytes::from_static(&[9]),
        });
        round_trip(Frame::RstStream { stream_id: 7, status: 5 });
        round_trip(Frame::Settings {
            clear: true,
            settings: vec![
                Setting { flags: 1, id: 7, value: 65536 },
                Setting { flags: 0, id: 4, value: 100 },
            ],
        });
        round_trip(Frame::Ping { id: 1 });
        round_trip(Frame::GoAway { last_good_stream_id: 9, status: 0 });
        round_trip(Frame::Headers {
            stream_id: 1,
            fin: true,
            header_block: Bytes::from_static(&[4, 4]),
        });
        round_trip(Frame::WindowUpdate { stream_id: 0, delta: 1024 });
        round_trip(Frame::Unknown {
            frame_type: 10,
            flags: 0,
            payload: Bytes::from_static(b"cred"),
        });
    }

    #[test]
    fn control_frames_are_laid_out_as_the_draft_shows() {
        let mut wire = BytesMut::new();
        Frame::Ping { id: 0x0102_0304 }.encode(&mut wire);
        // Control bit and version 3, type 6, no flags, length 4, the id.
        assert_eq!(&wire[..], &[0x80, 0x03, 0x00, 0x06, 0x00, 0x00, 0x00, 0x04, 1, 2, 3, 4]);
        let mut wire = BytesMut::new();
        Frame::Data { stream_id: 3, fin: true, data: Bytes::from_static(b"ab") }.encode(&mut wire);
        assert_eq!(&wire[..], &[0, 0, 0, 3, 0x01, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn frames_that_arrive_back_to_back_are_parsed_one_at_a_time() {
        let mut wire = BytesMut::new();
        Frame::Ping { id: 1 }.encode(&mut wire);
        Frame::Data { stream_id: 1, fin: false, data: Bytes::from_static(b"x") }.encode(&mut wire);
        assert_eq!(Frame::decode(&mut wire), Ok(Some(Frame::Ping { id: 1 })));
        assert!(matches!(Frame::decode(&mut wire), Ok(Some(Frame::Data { stream_id: 1, .. }))));
        assert_eq!(Frame::decode(&mut wire), Ok(None));
    }

    #[test]
    fn wrong_versions_oversized_and_malformed_frames_are_refused() {
        let mut spdy2 = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(Frame::decode(&mut spdy2), Err(FrameError::UnsupportedVersion(2)));
        let mut huge = BytesMut::from(&[0, 0, 0, 1, 0, 0x20, 0, 0][..]);
        assert_eq!(Frame::decode(&mut huge), Err(FrameError::TooLarge(0x20_0000)));
        let mut short_ping = BytesMut::from(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 2, 0, 1][..]);
        assert!(matches!(
            Frame::decode(&mut short_ping),
            Err(FrameError::Malformed { kind: "PING", .. })
        ));
    }
}
