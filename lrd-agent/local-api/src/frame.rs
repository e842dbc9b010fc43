//! Framing on the agent's Unix socket: a little-endian `u32` body length, then the body, one
//! JSON object of at most [`MAX_FRAME`] bytes. A frame announcing more than that is refused
//! before anything is read or allocated.

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest body either side accepts, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// What can go wrong reading or writing a frame.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the stream cleanly between frames.
    Closed,
    /// A frame announced a body larger than [`MAX_FRAME`] (or a message encoded larger).
    TooLarge(usize),
    /// The body is not a valid message.
    Malformed(String),
    /// The stream failed (or ended in the middle of a frame).
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed"),
            Self::TooLarge(len) => {
                write!(
                    f,
                    "frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes"
                )
            }
            Self::Malformed(message) => write!(f, "malformed message: {message}"),
            Self::Io(error) => write!(f, "i/o error: {error}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

/// The body length announced by a frame header, refused if over the limit.
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Encodes `message` as one frame (header and body).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut bytes = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut bytes, message)
        .map_err(|error| FrameError::Malformed(error.to_string()))?;
    let len = bytes.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // `len <= MAX_FRAME` fits in a u32.
    bytes[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(bytes)
}

/// Decodes a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|error| FrameError::Malformed(error.to_string()))
}

/// Writes `message` as one frame.
pub fn write_frame<W: Write, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?)?;
    writer.flush()?;
    Ok(())
}

/// Reads one frame body. A clean end of stream before the header is [`FrameError::Closed`].
pub fn read_frame<R: Read>(reader: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut header = [0; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error.into()),
        }
    }
    let mut body = vec![0; body_len(header)?];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Sends `request` and reads the one reply: the whole client side of the protocol.
pub fn call<S: Read + Write, Q: Serialize, A: DeserializeOwned>(
    stream: &mut S,
    request: &Q,
) -> Result<A, FrameError> {
    write_frame(stream, request)?;
    decode(&read_frame(stream)?)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::message::{Request, Response};

    #[test]
    fn frames_round_trip_back_to_back() {
        let a = Request::RemoveListener {
            ip: "::1".parse().unwrap(),
            port: 9,
            protocol: crate::message::Protocol::Udp,
        };
        let b = Response::Ok {
            revision: Some(7),
            queued: false,
        };
        let mut stream = encode(&a).unwrap();
        stream.extend(encode(&b).unwrap());
        let mut reader = Cursor::new(stream);
        assert_eq!(
            decode::<Request>(&read_frame(&mut reader).unwrap()).unwrap(),
            a
        );
        assert_eq!(
            decode::<Response>(&read_frame(&mut reader).unwrap()).unwrap(),
            b
        );
        assert!(matches!(read_frame(&mut reader), Err(FrameError::Closed)));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_the_body() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        bytes.extend([b' '; 16]);
        let err = read_frame(&mut Cursor::new(bytes)).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME + 1),
            "{err}"
        );
        assert!(matches!(
            body_len(u32::MAX.to_le_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(
            body_len((MAX_FRAME as u32).to_le_bytes()).unwrap(),
            MAX_FRAME
        );
        let huge = Request::RegisterWorkload {
            namespace: "a".repeat(MAX_FRAME),
            name: "b".into(),
            labels: Default::default(),
            ips: vec![],
        };
        assert!(matches!(encode(&huge), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn truncated_and_malformed_frames_are_errors() {
        let mut bytes = 10u32.to_le_bytes().to_vec();
        bytes.extend(b"{\"ki");
        assert!(matches!(
            read_frame(&mut Cursor::new(bytes)),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![1, 0])),
            Err(FrameError::Io(_))
        ));
        assert!(matches!(
            decode::<Request>(b"{not json"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(b"[]"),
            Err(FrameError::Malformed(_))
        ));
    }
}
