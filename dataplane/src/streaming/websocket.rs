//! The WebSocket protocol (RFC 6455) as far as a server of remote commands needs it: the
//! opening handshake's accept key, and frames (section 5.2) with client masking,
//! fragmentation, and the close, ping and pong control frames.

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Appended to the client's key before hashing (section 1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The only version RFC 6455 defines (section 4.1).
pub const VERSION: &str = "13";
/// The largest message this side accepts (after reassembly). Remote command clients send
/// stdin in chunks of at most 32 KiB plus the channel byte.
pub const MAX_MESSAGE: usize = 1 << 20;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (section 4.2.2, item 5.4).
pub fn accept_key(client_key: &str) -> String {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    hash.update(client_key.trim().as_bytes());
    hash.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hash.finish())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// One frame, payload unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("a client frame is not masked (RFC 6455 section 5.1)")]
    Unmasked,
    #[error("a control frame is fragmented or longer than 125 bytes")]
    BadControlFrame,
    #[error("a message of more than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("a continuation frame without a message to continue, or a new message inside one")]
    BadFragmentation,
}

/// Status codes of close frames (section 7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
}

impl WsFrame {
    /// Parses one frame sent by a client (which must mask it) from the front of `buffer`;
    /// `None` until a whole frame is there.
    pub fn decode_client(buffer: &mut BytesMut) -> Result<Option<WsFrame>, WsError> {
        if buffer.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (buffer[0], buffer[1]);
        if first & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        let opcode = Opcode::from_bits(first & 0x0f).ok_or(WsError::UnknownOpcode(first & 0x0f))?;
        let fin = first & 0x80 != 0;
        if second & 0x80 == 0 {
            return Err(WsError::Unmasked);
        }
        let (length, mut offset) = match second & 0x7f {
            126 if buffer.len() >= 4 => (u64::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4),
            127 if buffer.len() >= 10 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&buffer[2..10]);
                (u64::from_be_bytes(bytes), 10)
            }
            126 | 127 => return Ok(None),
            short => (u64::from(short), 2),
        };
        if opcode.is_control() && (!fin || length > 125) {
            return Err(WsError::BadControlFrame);
        }
        if length > MAX_MESSAGE as u64 {
            return Err(WsError::TooLarge);
        }
        let length = length as usize;
        if buffer.len() < offset + 4 + length {
            return Ok(None);
        }
        let mask = [buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3]];
        offset += 4;
        buffer.advance(offset);
        let mut payload = buffer.split_to(length);
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[index % 4];
        }
        Ok(Some(WsFrame { fin, opcode, payload: payload.freeze() }))
    }

    /// Appends the frame as a server sends it: unmasked (section 5.1).
    pub fn encode_server(&self, out: &mut BytesMut) {
        out.put_u8(if self.fin { 0x80 } else { 0 } | self.opcode.bits());
        let length = self.payload.len();
        if length < 126 {
            out.put_u8(length as u8);
        } else if length <= usize::from(u16::MAX) {
            out.put_u8(126);
            out.put_u16(length as u16);
        } else {
            out.put_u8(127);
            out.put_u64(length as u64);
        }
        out.put_slice(&self.payload);
    }

    /// A client's frame, masked with `mask` (for tests of the server side).
    #[cfg(test)]
    pub fn encode_client(&self, mask: [u8; 4], out: &mut BytesMut) {
        let mut unmasked = BytesMut::new();
        self.encode_server(&mut unmasked);
        let header_len = match self.payload.len() {
            0..126 => 2,
            126..=65535 => 4,
            _ => 10,
        };
        unmasked[1] |= 0x80;
        out.put_slice(&unmasked[..header_len]);
        out.put_slice(&mask);
        for (index, byte) in self.payload.iter().enumerate() {
            out.put_u8(byte ^ mask[index % 4]);
        }
    }

    pub fn message(opcode: Opcode, payload: impl Into<Bytes>) -> Self {
        Self { fin: true, opcode, payload: payload.into() }
    }

    /// A close frame with a status code and a reason (section 5.5.1).
    pub fn close(code: u16, reason: &str) -> Self {
        let mut payload = BytesMut::with_capacity(2 + reason.len());
        payload.put_u16(code);
        // Control payloads are at most 125 bytes; a reason is cut at a character boundary.
        let mut reason = reason;
        while reason.len() > 123 {
            let mut cut = 123;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason = &reason[..cut];
        }
        payload.put_slice(reason.as_bytes());
        Self::message(Opcode::Close, payload.freeze())
    }
}

/// A whole message, or a control frame, as the reader hands it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsMessage {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The close status code, if the frame had one.
    Close(Option<u16>),
}

/// Reassembles fragmented messages (section 5.4); control frames may arrive between the
/// fragments and are handed on at once.
#[derive(Debug, Default)]
pub struct MessageAssembler {
    partial: Option<(Opcode, BytesMut)>,
}

impl MessageAssembler {
    pub fn push(&mut self, frame: WsFrame) -> Result<Option<WsMessage>, WsError> {
        let whole = |opcode, payload: Bytes| match opcode {
            Opcode::Text => WsMessage::Text(payload),
            _ => WsMessage::Binary(payload),
        };
        match frame.opcode {
            Opcode::Ping => Ok(Some(WsMessage::Ping(frame.payload))),
            Opcode::Pong => Ok(Some(WsMessage::Pong(frame.payload))),
            Opcode::Close => {
                let code = (frame.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                Ok(Some(WsMessage::Close(code)))
            }
            Opcode::Text | Opcode::Binary => {
                if self.partial.is_some() {
                    return Err(WsError::BadFragmentation);
                }
                if frame.fin {
                    return Ok(Some(whole(frame.opcode, frame.payload)));
                }
                self.partial = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
                Ok(None)
            }
            Opcode::Continuation => {
                let Some((opcode, mut buffer)) = self.partial.take() else {
                    return Err(WsError::BadFragmentation);
                };
                if buffer.len() + frame.payload.len() > MAX_MESSAGE {
                    return Err(WsError::TooLarge);
                }
                buffer.put_slice(&frame.payload);
                if frame.fin {
                    return Ok(Some(whole(opcode, buffer.freeze())));
                }
                self.partial = Some((opcode, buffer));
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};

    use super::{MessageAssembler, Opcode, WsError, WsFrame, WsMessage, accept_key};

    #[test]
    fn the_accept_key_is_computed_as_the_rfc_example_shows() {
        // RFC 6455 section 1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn masked_client_frames_of_every_length_class_are_decoded() {
        for length in [0usize, 5, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let frame = WsFrame::message(Opcode::Binary, payload.clone());
            let mut wire = BytesMut::new();
            frame.encode_client([0x37, 0xfa, 0x21, 0x3d], &mut wire);
            let mut short = BytesMut::from(&wire[..wire.len() - 1]);
            assert_eq!(WsFrame::decode_client(&mut short), Ok(None));
            let decoded = WsFrame::decode_client(&mut wire).unwrap().expect("whole frame");
            assert_eq!(decoded.payload.len(), length);
            assert_eq!(&decoded.payload[..], &payload[..]);
            assert!(wire.is_empty());
        }
    }

    #[test]
    fn the_rfc_single_frame_masked_hello_is_decoded() {
        // RFC 6455 section 5.7: a single-frame masked text message "Hello".
        let mut wire =
            BytesMut::from(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58][..]);
        let frame = WsFrame::decode_client(&mut wire).unwrap().unwrap();
        assert_eq!(
            (frame.fin, frame.opcode, &frame.payload[..]),
            (true, Opcode::Text, &b"Hello"[..])
        );
        // The unmasked server form of the same message.
        let mut out = BytesMut::new();
        WsFrame::message(Opcode::Text, Bytes::from_static(b"Hello")).encode_server(&mut out);
        assert_eq!(&out[..], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    }

    #[test]
    fn unmasked_reserved_and_oversized_control_frames_are_refused() {
        let mut unmasked = BytesMut::from(&[0x82, 0x01, 0x00][..]);
        assert_eq!(WsFrame::decode_client(&mut unmasked), Err(WsError::Unmasked));
        let mut reserved = BytesMut::from(&[0xc2, 0x80, 0, 0, 0, 0][..]);
        assert_eq!(WsFrame::decode_client(&mut reserved), Err(WsError::ReservedBits));
        let mut long_ping = BytesMut::new();
        WsFrame::message(Opcode::Ping, vec![0u8; 126]).encode_client([1, 2, 3, 4], &mut long_ping);
        assert_eq!(WsFrame::decode_client(&mut long_ping), Err(WsError::BadControlFrame));
    }

    #[test]
    fn fragments_are_reassembled_around_control_frames() {
        let mut assembler = MessageAssembler::default();
        let part = |fin, opcode, data: &'static [u8]| WsFrame {
            fin,
            opcode,
            payload: Bytes::from_static(data),
        };
        assert_eq!(assembler.push(part(false, Opcode::Binary, b"\x00ab")), Ok(None));
        assert_eq!(
            assembler.push(part(true, Opcode::Ping, b"hb")),
            Ok(Some(WsMessage::Ping(Bytes::from_static(b"hb"))))
        );
        assert_eq!(assembler.push(part(false, Opcode::Continuation, b"cd")), Ok(None));
        assert_eq!(
            assembler.push(part(true, Opcode::Continuation, b"e")),
            Ok(Some(WsMessage::Binary(Bytes::from_static(b"\x00abcde"))))
        );
        assert_eq!(
            assembler.push(part(true, Opcode::Continuation, b"x")),
            Err(WsError::BadFragmentation)
        );
        let close = WsFrame::close(1000, "done");
        assert_eq!(assembler.push(close), Ok(Some(WsMessage::Close(Some(1000)))));
    }
}
