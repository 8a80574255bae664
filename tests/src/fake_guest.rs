//! A fake guest on the socket where the vsock backend delivers guest connections, so a
//! test can play a hostile or broken guest.

use crate::TestHost;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use vmhost_guest_protocol::{self as protocol, FrameDecoder, GuestMessage, HostMessage};

/// How long the host may stay silent before a read fails the test.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FakeGuest {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl FakeGuest {
    pub fn connect(host: &TestHost, vm: &str) -> FakeGuest {
        let path = host
            .state_dir()
            .join("vms")
            .join(vm)
            .join(format!("vsock.sock_{}", protocol::GUEST_PORT));
        let stream = UnixStream::connect(&path).expect("connect to the guest link socket");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        FakeGuest {
            stream,
            decoder: FrameDecoder::new(),
        }
    }

    pub fn hello(host: &TestHost, vm: &str) -> FakeGuest {
        let mut guest = FakeGuest::connect(host, vm);
        guest.send(&GuestMessage::Hello {
            min_version: 1,
            max_version: 1,
        });
        assert_eq!(guest.receive(), Some(HostMessage::Welcome { version: 1 }));
        guest
    }

    pub fn send(&mut self, message: &GuestMessage) {
        let _ = self.stream.write_all(&protocol::encode(message).unwrap());
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next message, or None once the host has closed the connection. A host that
    /// neither answers nor closes within the read timeout fails the test: silence is not
    /// a close.
    pub fn receive(&mut self) -> Option<HostMessage> {
        loop {
            if let Some(body) = self.decoder.next_frame().unwrap() {
                return Some(protocol::decode(&body).unwrap());
            }
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                // A close that leaves what we sent unread arrives as a reset.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("the host neither answered nor closed the link in {READ_TIMEOUT:?}")
                }
                Err(e) => panic!("fake guest read: {e}"),
                Ok(n) => self.decoder.push(&buf[..n]),
            }
        }
    }

    /// Reads until the host closes; returns what it said on the way.
    pub fn drain(&mut self) -> Vec<HostMessage> {
        std::iter::from_fn(|| self.receive()).collect()
    }
}
