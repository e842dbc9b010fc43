//! Arbitrary bytes as what a local process sends on `agent.sock` (`stackroute_local_api`): a
//! stream of frames (the `u32` length header and its bound, then the body) and a bare body.
//! Decoding must reject or accept without panicking; an accepted request re-encodes, decodes
//! back to the same request, and names its kind. The agent reads frames with the same
//! `frame::body_len` bound and decodes bodies with the same `frame::decode::<Request>`.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use stackroute_local_api::frame::{self, FrameError, HEADER_LEN, MAX_FRAME};
use stackroute_local_api::message::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.get(..HEADER_LEN) {
        let header: [u8; HEADER_LEN] = header.try_into().expect("4 bytes");
        match frame::body_len(header) {
            Ok(len) => assert!(len <= MAX_FRAME),
            Err(error) => assert!(matches!(error, FrameError::TooLarge(n) if n > MAX_FRAME)),
        }
    }
    let mut stream = Cursor::new(data);
    while let Ok(body) = frame::read_frame(&mut stream) {
        assert!(body.len() <= MAX_FRAME);
        body_of_a_frame(&body);
    }
    body_of_a_frame(data);
});

fn body_of_a_frame(body: &[u8]) {
    // The agent's replies decode with the same framing (the shim and the CLI read them).
    let _ = frame::decode::<Response>(body);
    let Ok(request) = frame::decode::<Request>(body) else {
        return;
    };
    let _ = request.kind();
    match frame::encode(&request) {
        Ok(bytes) => {
            let len = u32::from_le_bytes(bytes[..HEADER_LEN].try_into().expect("4 bytes"));
            assert_eq!(len as usize, bytes.len() - HEADER_LEN);
            let again: Request =
                frame::decode(&bytes[HEADER_LEN..]).expect("an encoded request decodes");
            assert_eq!(again, request, "a request changed through encoding");
        }
        // Defaults the input left out (`"stacks":[]`, `"count":1`, …) are written back: only
        // a body close to the limit may grow past it.
        Err(FrameError::TooLarge(_)) if body.len() > MAX_FRAME / 2 => {}
        Err(error) => panic!("a decoded request does not encode again: {error}"),
    }
}
