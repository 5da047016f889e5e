//! SPDY/3 name/value header blocks (draft 3, section 2.6.10): a count, then length-prefixed
//! names and values, all 32-bit big-endian lengths, compressed with zlib. One compression
//! stream runs per direction for the whole connection, primed with the dictionary of section
//! 2.6.10.1; every block ends with a sync flush so the receiver can decode it at once.

use std::sync::LazyLock;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Header names and common values, each preceded by its 32-bit length, then a run of common
/// value fragments without lengths: the dictionary SPDY/3 primes zlib with.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information",
    "204 No Content",
    "301 Moved Permanently",
    "400 Bad Request",
    "401 Unauthorized",
    "403 Forbidden",
    "404 Not Found",
    "500 Internal Server Error",
    "501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec ",
    "00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The compression dictionary, assembled once.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut dictionary = Vec::new();
    for word in DICTIONARY_WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    dictionary
});

/// The most a block may inflate to: generous for the few headers of a remote command, small
/// enough that a compressed bomb cannot make the agent allocate much.
const MAX_DECOMPRESSED: usize = 256 * 1024;

/// Name/value pairs in the order sent. Names are lowercase on the wire; several values of one
/// name travel as one value separated by NUL bytes.
pub type HeaderList = Vec<(String, String)>;

#[derive(Debug, thiserror::Error)]
pub enum HeaderBlockError {
    #[error("inflating a header block: {0}")]
    Inflate(#[from] flate2::DecompressError),
    #[error("deflating a header block: {0}")]
    Deflate(#[from] flate2::CompressError),
    #[error("a header block inflates to more than {MAX_DECOMPRESSED} bytes")]
    TooLarge,
    #[error("a header block is truncated or malformed")]
    Malformed,
    #[error("header name {0:?} is not lowercase")]
    UppercaseName(String),
}

/// The value of `name` (compared case-insensitively) in `headers`.
pub fn header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The compressing side of one direction of a connection.
pub struct HeaderCompressor {
    zlib: Compress,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut zlib = Compress::new(Compression::best(), true);
        zlib.set_dictionary(&DICTIONARY).expect("a fresh zlib stream takes a dictionary");
        Self { zlib }
    }

    /// The compressed block for `headers` (names lowercased).
    pub fn compress(&mut self, headers: &[(&str, &str)]) -> Result<Bytes, HeaderBlockError> {
        let mut plain = BytesMut::new();
        plain.put_u32(headers.len() as u32);
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            plain.put_u32(name.len() as u32);
            plain.put_slice(name.as_bytes());
            plain.put_u32(value.len() as u32);
            plain.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(plain.len() + 64);
        let start = self.zlib.total_in();
        loop {
            let consumed = (self.zlib.total_in() - start) as usize;
            if out.capacity() == out.len() {
                out.reserve(256);
            }
            self.zlib.compress_vec(&plain[consumed..], &mut out, FlushCompress::Sync)?;
            let consumed = (self.zlib.total_in() - start) as usize;
            // A sync flush is complete once all input is taken and zlib left room unused.
            if consumed == plain.len() && out.len() < out.capacity() {
                return Ok(Bytes::from(out));
            }
        }
    }
}

/// The inflating side of one direction of a connection.
pub struct HeaderDecompressor {
    zlib: Decompress,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self { zlib: Decompress::new(true) }
    }

    /// The pairs of one compressed block. Names must be lowercase (section 2.6.10).
    pub fn decompress(&mut self, block: &[u8]) -> Result<HeaderList, HeaderBlockError> {
        let mut plain = Vec::with_capacity(block.len() * 4 + 64);
        let start = self.zlib.total_in();
        loop {
            let consumed = (self.zlib.total_in() - start) as usize;
            if plain.len() == plain.capacity() {
                if plain.len() >= MAX_DECOMPRESSED {
                    return Err(HeaderBlockError::TooLarge);
                }
                plain.reserve(plain.len().max(256));
            }
            let before = plain.len();
            match self.zlib.decompress_vec(&block[consumed..], &mut plain, FlushDecompress::Sync) {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                // The first block names the dictionary by its Adler-32 (RFC 1950, FDICT);
                // zlib checks it against the one given.
                Err(error) if error.needs_dictionary().is_some() => {
                    self.zlib.set_dictionary(&DICTIONARY)?;
                    continue;
                }
                Err(error) => return Err(error.into()),
            }
            let consumed = (self.zlib.total_in() - start) as usize;
            if consumed == block.len() && plain.len() < plain.capacity() {
                break;
            }
            if consumed == block.len() && plain.len() == before {
                break;
            }
        }
        parse_pairs(&plain)
    }
}

fn parse_pairs(mut plain: &[u8]) -> Result<HeaderList, HeaderBlockError> {
    let take = |plain: &mut &[u8]| -> Result<String, HeaderBlockError> {
        if plain.remaining() < 4 {
            return Err(HeaderBlockError::Malformed);
        }
        let length = plain.get_u32() as usize;
        if plain.remaining() < length {
            return Err(HeaderBlockError::Malformed);
        }
        let text = String::from_utf8_lossy(&plain[..length]).into_owned();
        plain.advance(length);
        Ok(text)
    };
    if plain.remaining() < 4 {
        return Err(HeaderBlockError::Malformed);
    }
    let count = plain.get_u32() as usize;
    let mut headers = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let name = take(&mut plain)?;
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(HeaderBlockError::UppercaseName(name));
        }
        let value = take(&mut plain)?;
        headers.push((name, value));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::{DICTIONARY, HeaderBlockError, HeaderCompressor, HeaderDecompressor, header};

    #[test]
    fn the_dictionary_is_the_one_the_draft_defines() {
        // Its size and Adler-32 (RFC 1950 section 8.2), the identity a peer's zlib stream
        // names it by: a single wrong byte changes it and no peer could inflate our headers.
        assert_eq!(DICTIONARY.len(), 1423);
        let (mut a, mut b) = (1u32, 0u32);
        for byte in DICTIONARY.iter() {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        // The Adler-32 of the dictionary kubectl's SPDY library carries (1423 bytes).
        assert_eq!(b << 16 | a, 0xe3c6_a7c2, "adler32");
    }

    #[test]
    fn blocks_round_trip_over_one_stream_in_order() {
        let mut compressor = HeaderCompressor::new();
        let mut decompressor = HeaderDecompressor::new();
        let first = compressor.compress(&[("streamType", "error")]).expect("compress");
        let second = compressor.compress(&[("streamtype", "stdout"), ("x", "a\0b")]).unwrap();
        let empty = compressor.compress(&[]).unwrap();
        let headers = decompressor.decompress(&first).expect("decompress");
        assert_eq!(headers, vec![("streamtype".to_owned(), "error".to_owned())]);
        let headers = decompressor.decompress(&second).unwrap();
        assert_eq!(header(&headers, "StreamType"), Some("stdout"));
        assert_eq!(header(&headers, "x"), Some("a\0b"), "multi-values stay joined by NUL");
        assert!(decompressor.decompress(&empty).unwrap().is_empty());
        // The second block refers back to the first (the shared window): decoded alone, by a
        // fresh stream, it cannot be read.
        assert!(HeaderDecompressor::new().decompress(&second).is_err());
    }

    #[test]
    fn large_header_values_survive() {
        let mut compressor = HeaderCompressor::new();
        let mut decompressor = HeaderDecompressor::new();
        let value: String = (0..20_000).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
        let block = compressor.compress(&[("big", &value)]).unwrap();
        assert_eq!(header(&decompressor.decompress(&block).unwrap(), "big"), Some(&*value));
    }

    #[test]
    fn garbage_and_uppercase_names_are_refused() {
        assert!(HeaderDecompressor::new().decompress(b"not zlib at all").is_err());
        // A block whose name has capitals, compressed by hand without lowercasing.
        let mut zlib = flate2::Compress::new(flate2::Compression::best(), true);
        zlib.set_dictionary(&DICTIONARY).unwrap();
        let mut plain = Vec::new();
        plain.extend_from_slice(&1u32.to_be_bytes());
        plain.extend_from_slice(&4u32.to_be_bytes());
        plain.extend_from_slice(b"Host");
        plain.extend_from_slice(&1u32.to_be_bytes());
        plain.extend_from_slice(b"x");
        let mut out = Vec::with_capacity(256);
        zlib.compress_vec(&plain, &mut out, flate2::FlushCompress::Sync).unwrap();
        assert!(matches!(
            HeaderDecompressor::new().decompress(&out),
            Err(HeaderBlockError::UppercaseName(name)) if name == "Host"
        ));
    }
}
