//! A cap on the fragments of one WebSocket message.
//!
//! tungstenite bounds a message's size but not its number of frames: a client may send a
//! million empty continuation frames, each costing the server a frame's work. It does not
//! expose frames as they arrive either, so [`FragmentCap`] sits under it, between the socket
//! and tungstenite, and reads the frame headers as the bytes go by (RFC 6455 §5.2: two
//! bytes, an extended length of 0, 2 or 8 bytes, a masking key of 0 or 4). It never
//! changes a byte. When a message's data frames exceed the cap, its read fails once with
//! [`TooManyFragments`]; the connection then closes with 1009, and later reads pass
//! through untouched so the close handshake can complete.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The error a read returns when a message has more frames than the cap.
#[derive(Debug, thiserror::Error)]
#[error("a WebSocket message in more than {0} frames")]
pub struct TooManyFragments(pub usize);

impl TooManyFragments {
    /// Whether an I/O error is this one.
    pub fn is(error: &io::Error) -> bool {
        error
            .get_ref()
            .is_some_and(|inner| inner.is::<TooManyFragments>())
    }
}

/// Counts the data frames of each incoming message (see the module doc).
#[derive(Debug)]
pub struct FrameCounter {
    max: usize,
    /// Header bytes of the frame being read, until it is whole.
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// Data frames of the message in progress (0 between messages).
    frames: usize,
}

impl FrameCounter {
    pub fn new(max: usize) -> Self {
        FrameCounter {
            max: max.max(1),
            header: [0; 14],
            have: 0,
            payload_left: 0,
            frames: 0,
        }
    }

    /// Follows `bytes`, the next ones from the client; `Err` once a message goes over the
    /// cap.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TooManyFragments> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.have < 2 || self.have < header_len(self.header[1]) {
                continue;
            }
            self.payload_left = payload_len(&self.header);
            self.have = 0;
            self.frame(self.header[0])?;
        }
        Ok(())
    }

    /// A whole header was read: `first` is its first byte (FIN and opcode).
    fn frame(&mut self, first: u8) -> Result<(), TooManyFragments> {
        let fin = first & 0x80 != 0;
        match first & 0x0f {
            // A continuation: one more frame of the message in progress.
            0x0 => self.frames += 1,
            // Text or binary: a message starts.
            0x1 | 0x2 => self.frames = 1,
            // Control frames sit between fragments and belong to no message; reserved
            // opcodes are tungstenite's to refuse.
            _ => return Ok(()),
        }
        if self.frames > self.max {
            return Err(TooManyFragments(self.max));
        }
        if fin {
            self.frames = 0;
        }
        Ok(())
    }
}

/// The header's length from its second byte: 2, the extended length, the masking key.
fn header_len(second: u8) -> usize {
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

fn payload_len(header: &[u8; 14]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes([
            header[2], header[3], header[4], header[5], header[6], header[7], header[8], header[9],
        ]),
        short => u64::from(short),
    }
}

/// A client's byte stream with its messages' frames counted (see the module doc).
#[derive(Debug)]
pub struct FragmentCap<S> {
    inner: S,
    /// `None` once the cap was hit: the rest passes through.
    counter: Option<FrameCounter>,
}

impl<S> FragmentCap<S> {
    pub fn new(inner: S, max_fragments: usize) -> Self {
        FragmentCap {
            inner,
            counter: Some(FrameCounter::new(max_fragments)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FragmentCap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(counter)) = (&read, this.counter.as_mut()) {
            if let Err(e) = counter.feed(&buf.filled()[before..]) {
                this.counter = None;
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FragmentCap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;

    /// A client frame as tungstenite writes it (masked).
    fn frame(opcode: OpCode, fin: bool, len: usize) -> Vec<u8> {
        let payload = vec![b'x'; len];
        let mut frame = match opcode {
            OpCode::Control(Control::Ping) => Frame::ping(payload),
            OpCode::Control(_) => Frame::pong(payload),
            OpCode::Data(_) => Frame::message(payload, opcode, fin),
        };
        frame.header_mut().mask = Some([1, 2, 3, 4]);
        let mut out = Vec::new();
        frame.format(&mut out).expect("format");
        out
    }

    fn continuation(fin: bool, len: usize) -> Vec<u8> {
        frame(OpCode::Data(Data::Continue), fin, len)
    }

    /// Feeds the stream in chunks of every size from 1 up, so that headers split anywhere.
    fn feed_chunked(max: usize, stream: &[u8]) -> Result<(), TooManyFragments> {
        for chunk in 1..=17 {
            let mut counter = FrameCounter::new(max);
            for piece in stream.chunks(chunk) {
                counter.feed(piece)?;
            }
            assert_eq!(
                (counter.have, counter.payload_left),
                (0, 0),
                "chunk {chunk}"
            );
        }
        Ok(())
    }

    #[test]
    fn messages_within_the_cap_pass_whatever_their_sizes_and_splits() {
        let mut stream = Vec::new();
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            stream.extend(frame(OpCode::Data(Data::Text), true, len));
        }
        // Four frames, a ping and a pong between them: control frames do not count.
        stream.extend(frame(OpCode::Data(Data::Binary), false, 10));
        stream.extend(frame(OpCode::Control(Control::Ping), true, 3));
        stream.extend(continuation(false, 200));
        stream.extend(frame(OpCode::Control(Control::Pong), true, 0));
        stream.extend(continuation(false, 0));
        stream.extend(continuation(true, 70_000));
        stream.extend(frame(OpCode::Data(Data::Text), true, 5));
        assert!(feed_chunked(4, &stream).is_ok());
    }

    #[test]
    fn one_frame_over_the_cap_is_refused_and_the_count_restarts_per_message() {
        let message = |frames: usize| {
            let mut m = frame(OpCode::Data(Data::Text), frames == 1, 1);
            for i in 1..frames {
                m.extend(continuation(i + 1 == frames, 0));
            }
            m
        };
        let mut within = message(8);
        within.extend(message(8));
        assert!(feed_chunked(8, &within).is_ok());
        assert!(feed_chunked(8, &message(9)).is_err());
        // Unfinished: the ninth frame is refused before the message ends.
        let mut endless = frame(OpCode::Data(Data::Text), false, 0);
        for _ in 0..1000 {
            endless.extend(continuation(false, 0));
        }
        assert!(feed_chunked(8, &endless).is_err());
    }
}
